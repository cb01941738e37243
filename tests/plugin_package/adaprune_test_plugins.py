"""A fusion policy and an allocation from outside adaprune, to prove both extension points work.

* `first-candidate`: every site takes its first usable candidate alone;
* `leading-channels`: removes the first channels of every eligible layer, whatever the scores,
  up to the ratio of its MLP (a rule no built-in follows, so a test can tell it was used).
"""

from __future__ import annotations

from adaprune import LayerPlan, Level, UnitKind, hookimpl
from adaprune.allocation.base import Allocator
from adaprune.fusion.base import FusionPolicy


class FirstCandidate(FusionPolicy):
    name = "first-candidate"

    def site_weights(self, usable):
        return {next(iter(usable)): 1.0}


class LeadingChannels(Allocator):
    name = "leading-channels"
    fixed_counts = True

    def allocate(self, units, scores, budget):
        plans = [LayerPlan(i) for i in range(len(units))]
        if UnitKind.CHANNELS in budget.units:
            for i in budget.layers:
                width = units.layers[i].num_units[Level.CHANNEL]
                plans[i].remove_channels = list(range(int(budget.ratio * width)))
        return plans


@hookimpl
def adaprune_fusion_policies():
    return [FirstCandidate]


@hookimpl
def adaprune_allocations():
    return [LeadingChannels]
