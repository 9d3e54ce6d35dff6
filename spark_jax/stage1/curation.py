"""Solution-pool curation (D2, docs/method.md §2.4): balance correct and incorrect solutions per problem.

`reference` balances on the ground-truth grade (the authors' pipeline); `verifier_majority` balances on
the verifier's outcome-majority verdict instead (fully reference-free); `none` keeps every solution.
Problems whose solutions all share one label are dropped; each problem keeps k = min(#yes, #no) of each
label (shuffled with one `random.Random(seed)` walked in problem order), capped at `cap` per label.
"""

from __future__ import annotations

import collections
import random
from typing import Callable, Sequence

CURATIONS = ("reference", "verifier_majority", "none")


def balance(problems: Sequence[dict], label_of: Callable[[dict], bool | None], *, cap: int = 3,
            seed: int = 42) -> tuple[list[dict], dict]:
  """Returns (kept solutions, counts). Each problem is `{"problem_id", "solutions": [solution, ...]}`.

  `label_of(solution)` gives the label balanced on; None (e.g. ungradable) removes the solution.
  """
  rng = random.Random(seed)
  kept, counts = [], collections.Counter()
  for problem in problems:
    labelled = [(s, label_of(s)) for s in problem["solutions"]]
    counts["unlabelled_solutions"] += sum(label is None for _, label in labelled)
    yes = [s for s, label in labelled if label is True]
    no = [s for s, label in labelled if label is False]
    if not yes or not no:
      counts["problems_dropped_all_" + ("correct" if yes else "incorrect" if no else "unlabelled")] += 1
      continue
    rng.shuffle(yes)
    rng.shuffle(no)
    k = min(len(yes), len(no), cap)
    chosen = {id(s) for s in yes[:k] + no[:k]}
    kept.extend(s for s in problem["solutions"] if id(s) in chosen)  # keep sampling order
    counts["problems_kept"] += 1
  counts["solutions_kept"] = len(kept)
  return kept, dict(counts)
