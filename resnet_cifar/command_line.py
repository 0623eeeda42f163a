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

from resnet_cifar.config import INT_MAX, _stdout_to_devnull, fail  # noqa: F401  (the commands' one-line errors)

_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")     # a negative number is a value, not an option


def integer(minimum=None, maximum=INT_MAX):
    """An argparse `type`: an integer in [minimum, maximum], else one line saying which."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be positive" if minimum == 1
                                             else f"{value} must be at least {minimum}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{value} must be at most {maximum}")
        return value
    return parse


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
