"""What the commands share: the argparse ones (runner, analysis) in the trainer's error
style, one line `error: ...` and exit code 2; absl's help (trainer, benchmark) as a
success; `run`, the analysis commands' ending on Ctrl-C or a closed output pipe.

Plain argparse differs in three ways that mislead: it prints its usage above the error;
it takes any unambiguous prefix of an option, so the runner would read a trainer-style
`--seed=3` as `--seeds=3` (three seeds, not seed 3); and it reports a missing required
argument before an unknown one, so a misspelled `--result_dir=...` reads as "required:
--results_dir". Here prefixes are refused and an unknown option is reported first, with
the closest known one.
"""

import argparse
import difflib
import os
import re
import sys

_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")     # a negative number is a value, not an option


def fail(message, code=2):
    """Print `error: message` on stderr, on one line whatever a library's text held, and exit
    with `code`."""
    message = " ".join(str(message).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _stdout_to_devnull():
    """After a BrokenPipeError: nothing more to write, and no second error when Python exits."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def parse_absl(flag_values, argv):
    """`flag_values(argv)` (absl) as the absl commands' (trainer, benchmark) `flags_parser`:
    a bad flag or flagfile is one line `error: ...` (exit code 2) instead of absl's usage dump;
    -h is --help (absl knows -? only); and --help, --helpshort, --helpfull or --helpxml exit
    with 0: absl exits 1 there, the help asked for is a success."""
    from absl import flags

    argv = [argv[0]] + ["--help" if arg == "-h" else arg for arg in argv[1:]]
    try:
        return flag_values(argv)
    except SystemExit as e:
        if e.code == 1:
            sys.exit(0)
        raise
    except BrokenPipeError:          # the help piped into `head`, which stopped reading: done
        _stdout_to_devnull()
        sys.exit(0)
    except flags.Error as e:
        # a validator's "flag --x=v: must ..." as TrainConfig says it: "--x=v must ..."
        fail(re.sub(r"^flag (--\S+): must ", r"\1 must ", str(e).splitlines()[0].removeprefix("ERROR:: ")))
    except UnicodeDecodeError as e:  # a flagfile that is not text
        names = [a.split("=", 1)[1] for a in argv if a.startswith(("--flagfile=", "-flagfile="))]
        fail(f"--flagfile={','.join(names) or '?'}: not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:             # a flagfile that is a folder, unreadable, ...
        fail(f"cannot read flagfile {e.filename}: {e.strerror or e}")


def run(main):
    """`sys.exit(main())` for a command: Ctrl-C is one line (exit code 130), and output into a
    pipe whose reader has gone (`... | head`) ends quietly (exit code 1), not in a traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        code = 130
    except BrokenPipeError:
        _stdout_to_devnull()
        code = 1
    sys.exit(code)


def not_a_folder(path):
    """Why `path` cannot be read as a folder, in a few words."""
    return f"{path} is a file, not a folder" if os.path.exists(path) else f"no such folder: {path}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with one-line errors, no option prefixes, unknown options first."""

    def __init__(self, *args, forwarded=(), **kwargs):
        """`forwarded`: names of another command's flags that this one passes on after `--`
        (the runner's training flags); given before it, the error says where they go."""
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.forwarded = frozenset(forwarded)

    def error(self, message):
        fail(message)

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known = [option for action in self._actions for option in action.option_strings]
        for arg in args:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if arg.startswith("-") and arg != "-" and not _NUMBER.match(arg) and name not in known:
                if name.lstrip("-") in self.forwarded:
                    self.error(f"{name} is a training flag: give it after `--`, which passes what follows "
                               f"to every run (... -- {arg})")
                bare = {option.lstrip("-"): option for action in self._actions
                        if action.help != argparse.SUPPRESS for option in action.option_strings}
                close = difflib.get_close_matches(name.lstrip("-"), bare, n=1)
                self.error(f"unrecognized argument {arg}" + (f"; did you mean {bare[close[0]]}?" if close else ""))
        return super().parse_args(args, namespace)
