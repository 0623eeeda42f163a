"""The angular update of conv layers against its predicted equilibrium (beyond the post).

`conv_angular_update` is the per-step angle between a conv kernel before and after
its update, mean over layers, epoch mean: the quantity of rotational equilibrium
(Kosson, Messmer & Jaggi 2024). The dashed levels are the baseline's optimizer's
prediction per phase (`equilibrium.equilibrium_angular_update`; none for Adam with L2).
"""

from typing import Optional

from matplotlib.figure import Figure

from analysis import figures
from resnet_cifar import tags

TAG = tags.CONV_ANGULAR_UPDATE


def angular_update(angle: figures.Curves, labels=None, levels=None,
                   level_label: str = figures.LEVEL_LABEL,
                   configs: Optional[figures.Configs] = None) -> Optional[Figure]:
    """Every run's mean conv angular update per step (log scale), with the predicted levels
    (named in the legend by level_label, the formula of the baseline's optimizer); the runs'
    configs give the subtitle (data, schedule) and the learning-rate boundaries, as on the
    post's figures."""
    names = [n for n in figures.ordered_names(angle) if angle.get(n)]
    if not names:
        return None      # runs from before this diagnostic existed: nothing to draw, no note
    return figures.runs_figure("angular_update", angle, names,
                               "Angular update of conv layers", "mean angle per step (rad)",
                               labels, log_y=True, start_epoch=1, levels=levels,
                               level_label=level_label, configs=configs)
