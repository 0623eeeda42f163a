"""The runs by name, in one place: results-folder and flagfile names, legend labels and
colours, and which run a configuration is (`name_of`). The trainer's folder hint, the
runner (plan) and analysis (figures, the equivalence study, the claims) read them here.
"""

from resnet_cifar import fidelity

# The post's four runs, in its order.
BASELINE = "baseline"
NOCONV_L2 = "noconv_l2"
CONV_LR_SCALE = "conv_lr_scale"
CONV_LR_SCALE_BN098 = "conv_lr_scale_bn098"
POST_RUNS = (BASELINE, NOCONV_L2, CONV_LR_SCALE, CONV_LR_SCALE_BN098)
# Runs beyond the post that have flagfiles of their own.
CONV_LR_SCALE_PER_LAYER = "conv_lr_scale_per_layer"
CONV_LR_SCALE_PER_CHANNEL = "conv_lr_scale_per_channel"

LABELS = {
    BASELINE: "Baseline",
    NOCONV_L2: "NoConvL2",
    CONV_LR_SCALE: "ConvLRScale",
    CONV_LR_SCALE_BN098: "ConvLRScale BN 0.98",
    CONV_LR_SCALE_PER_LAYER: "ConvLRScale per layer",
    CONV_LR_SCALE_PER_CHANNEL: "ConvLRScale per channel",
}
# The post's plots show the baseline orange and the BN 0.98 run purple.
COLORS = {BASELINE: "tab:orange", NOCONV_L2: "tab:blue", CONV_LR_SCALE: "tab:green",
          CONV_LR_SCALE_BN098: "tab:purple"}

# The equivalence study names each replay run's granularity.
REPLAY_GRANULARITY = {CONV_LR_SCALE: "global", CONV_LR_SCALE_PER_LAYER: "per layer",
                      CONV_LR_SCALE_PER_CHANNEL: "per channel"}


def name_of(config):
    """The run of this registry that a run's flags (run_config.json "config") describe, or None.

    Lets analysis recognise the post's runs in folders named otherwise (runs/a, runs/b).
    """
    if not isinstance(config, dict) or config.get("optimizer", "momentum") != "momentum":
        return None
    conv_l2, scaled = config.get("conv_l2", True), config.get("conv_grad_scale", False)
    bn_fast = abs(float(config.get("bn_decay", fidelity.BATCH_NORM_DECAY)) - fidelity.BN_DECAY_FAST) < 1e-9
    if not scaled:
        return None if bn_fast else (BASELINE if conv_l2 else NOCONV_L2)
    if conv_l2:
        return None
    factor = config.get("conv_lr_factor", "piecewise")
    if factor in ("piecewise", "replay"):
        return CONV_LR_SCALE_BN098 if bn_fast else CONV_LR_SCALE
    return None if bn_fast else {"per_layer": CONV_LR_SCALE_PER_LAYER,
                                 "per_channel": CONV_LR_SCALE_PER_CHANNEL}.get(factor)
