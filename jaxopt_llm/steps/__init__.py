"""Pure train and eval steps: `train_step(state, batch, key) -> (state, metrics)`.

Metrics are {name: (sum, count)} so that means stay right when summed over devices and hosts.
"""

from jaxopt_llm.steps.common import mean_metrics

__all__ = ["mean_metrics"]
