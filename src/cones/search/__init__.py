"""The concept-neuron search: which attention weights, scaled down, lower the concept-implanting loss.

Theorem 3.1 of the paper: slightly scaling a weight θ down lowers L_con iff θ·∂L/∂θ > 0. The search
accumulates this score M_p over K points of a path from θ towards smaller weights, and calls the weights
with M_p > τ the concept neurons.

    result = find_concept_neurons(objective, pipe.unet, method="a2", steps=300, sparsity=0.01)
    result = find_concept_neurons(objective, pipe.unet, method=Algorithm1(lr=1e-3), threshold=0.0)

* `methods`: the strategies, Algorithm 1 (`"alg1"`) and Algorithm A2 (`"a2"`, default), small objects with
  one signature; `search_method` maps the user-facing names to them.
* `loop`: `find_concept_neurons`, the one loop they run in (with `callback=` and `disable=`), which leaves
  the UNet bit for bit as it was.
* `select`: `select_neurons`, the one rule from scores to neurons (M_p > τ, or a top share).
* `checkpoint`: resuming an interrupted search to the same concept.
* `result`: `SearchProgress`, `SearchResult`, `SearchError`.

The state is float32 (float64 for a float64 model) whatever the model's dtype. The search itself draws no
random numbers: the objective's seed fixes the run, and `objective.loss(k)` depends only on k, so a
checkpoint needs only the search state and the step. The multi-subject searches (refinement, joint and
sequential search) are in `cones.refine`, with the same call shape.
"""

from cones.search.checkpoint import check_checkpoint
from cones.search.loop import find_concept_neurons
from cones.search.methods import METHODS, Algorithm1, AlgorithmA2, SearchMethod, search_method
from cones.search.result import SearchError, SearchProgress, SearchResult
from cones.search.select import select_neurons

__all__ = [
    "METHODS",
    "Algorithm1",
    "AlgorithmA2",
    "SearchError",
    "SearchMethod",
    "SearchProgress",
    "SearchResult",
    "check_checkpoint",
    "find_concept_neurons",
    "search_method",
    "select_neurons",
]
