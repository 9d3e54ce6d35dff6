"""The embedded world's task: multi-step modular arithmetic with exact ground truth at every step.

A problem is a start value and 3-6 operations (`+ b`, `- b`, `* b` with a one-digit b), every result taken
modulo `TaskConfig.modulus` so that numbers stay one or two digits long. Because the reference chain is known,
every written step of every solution (a model's or a generated one) has an exact verdict, and the first wrong
step of a solution is known: the world can score labels, verifiers and PRMs against the truth.

Texts (all markers are the project's, byte for byte):

  problem         "Start with 7. Apply 1) + 5, 2) * 3, 3) - 4, keeping each result modulo 10."
  solution        the policy format, one `<step>` per operation:
                    <think>Step 1: <step> 7 + 5 = 2</step>\\n\\nStep 2: <step> 2 * 3 = 6</step>\\n\\n</think>
                    <answer>\\boxed{6}</answer>
                  `<think>`/`</think>` are special tokens of the world tokenizer, so the decoded text that
                  Stage I stores (special tokens skipped) is `Step 1: <step>...</step>\\n\\n...<answer>...`
                  and keeps the steps (the think stripping of Stage I would otherwise erase them); it is
                  also exactly what `processbench.render_steps` writes for the held-out set's cases (the
                  "Step k: " prefix and the blank-line separator), so a PRM sees one layout everywhere.
  verification    one `## Step k: a op b = r; written c; c - r = d` block per written step (the grader's
                  own result r, the written one c, their difference d) closed by the step marker, then the
                  final verdict line (`spark_jax.text.rm`).

Truth convention (the project's, see the verifier's worked example): a step is correct iff it and every
step before it are correct, so every step from the first error on is incorrect, even when its own
arithmetic is right. A solution's answer is correct iff the boxed answer equals the reference result
(it can be right by chance after a wrong step, as in real data).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Sequence

from spark_jax.text.answers import extract_answer
from spark_jax.text.rm import final_verdict_line, step_marker

OPS = ("+", "-", "*")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STEP_OPEN, STEP_CLOSE = "<step>", "</step>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
CHECK_WORD = " ="  # a verification block's "a op b = r; written c; c - r = d" (render_verification)
CHECK_STYLES = ("difference", "written")

# One written step: "<step>7 + 5 = 2</step>" (spaces optional), numbered or not outside the tags.
_STEP_RE = re.compile(r"<step>\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*</step>")
_ANY_STEP_RE = re.compile(r"<step>(.*?)</step>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Shape of the problems: modulus, number of operations, operand range."""
  modulus: int = 10
  min_ops: int = 3
  max_ops: int = 6
  max_operand: int = 9

  def __post_init__(self):
    if self.modulus < 2:
      raise ValueError(f"TaskConfig.modulus={self.modulus}; it must be >= 2.")
    if not 1 <= self.min_ops <= self.max_ops:
      raise ValueError(f"TaskConfig: need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}.")
    if self.max_operand < 2:
      raise ValueError(f"TaskConfig.max_operand={self.max_operand}; it must be >= 2.")


@dataclasses.dataclass(frozen=True)
class Problem:
  problem_id: str
  start: int
  ops: tuple[tuple[str, int], ...]
  modulus: int

  @property
  def values(self) -> list[int]:
    """The reference chain: values[0] = start, values[k] = result of operation k."""
    out = [self.start]
    for op, b in self.ops:
      out.append(apply(op, out[-1], b, self.modulus))
    return out

  @property
  def answer(self) -> str:
    return str(self.values[-1])

  @property
  def text(self) -> str:
    # Numbered operations: step k of a solution finds its operation by matching "Step k" against "k)", a
    # content-addressed lookup a two-layer transformer learns quickly (a bare list needs counting commas).
    ops = ", ".join(f"{k}) {op} {b}" for k, (op, b) in enumerate(self.ops, start=1))
    return f"Start with {self.start}. Apply {ops}, keeping each result modulo {self.modulus}."

  def to_record(self) -> dict:
    """The Stage I problem row: {id, problem, answer} (configs read `id_field`, `problem_field`, ...)."""
    return {"id": self.problem_id, "problem": self.text, "answer": self.answer,
            "start": self.start, "ops": [list(o) for o in self.ops], "modulus": self.modulus}

  @classmethod
  def from_record(cls, row: dict) -> "Problem":
    try:
      return cls(str(row["id"]), int(row["start"]), tuple((str(o), int(b)) for o, b in row["ops"]),
                 int(row["modulus"]))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"world problem row {str(row)[:120]!r} lacks a valid id/start/ops/modulus ({e}); "
                       "write problems with spark_jax.world.task.write_problems.") from e


def apply(op: str, a: int, b: int, modulus: int) -> int:
  if op == "+":
    return (a + b) % modulus
  if op == "-":
    return (a - b) % modulus
  if op == "*":
    return (a * b) % modulus
  raise ValueError(f"unknown operation {op!r}; use one of {OPS}.")


def make_problem(rng: random.Random, config: TaskConfig, problem_id: str) -> Problem:
  n = rng.randint(config.min_ops, config.max_ops)
  ops = []
  for _ in range(n):
    op = rng.choice(OPS)
    ops.append((op, rng.randint(2 if op == "*" else 1, config.max_operand)))
  return Problem(problem_id, rng.randrange(config.modulus), tuple(ops), config.modulus)


def make_problems(seed: int, n: int, config: TaskConfig = TaskConfig(), prefix: str = "w") -> list[Problem]:
  """`n` problems from `seed`; ids `<prefix><seed>-<i>`. Disjoint seeds give (almost surely) disjoint sets."""
  rng = random.Random(f"problems:{seed}")
  return [make_problem(rng, config, f"{prefix}{seed}-{i}") for i in range(n)]


# ------------------------------------------------------------------------------------------------ solutions


@dataclasses.dataclass(frozen=True)
class Step:
  a: int
  op: str
  b: int
  c: int

  def text(self) -> str:
    # The leading space makes every number the same token (" 7") in the problem, the step and the next step,
    # so copying the previous result and the operand is a plain token copy.
    return f" {self.a} {self.op} {self.b} = {self.c}"


def solve(problem: Problem, first_error: int = -1, rng: random.Random | None = None) -> list[Step]:
  """The written steps of a solution whose first wrong result is at 0-based step `first_error` (-1: none).

  The wrong result is a uniformly drawn value other than the right one; later steps compute correctly from
  the wrong value, so the error propagates (and the answer is wrong unless the chain re-converges).
  """
  if not -1 <= first_error < len(problem.ops):
    raise ValueError(f"problem {problem.problem_id}: first_error={first_error} outside -1..{len(problem.ops) - 1}.")
  if first_error >= 0 and rng is None:
    raise ValueError("solve: an injected error needs an rng to draw the wrong value.")
  steps, a = [], problem.start
  for k, (op, b) in enumerate(problem.ops):
    c = apply(op, a, b, problem.modulus)
    if k == first_error:
      c = rng.choice([v for v in range(problem.modulus) if v != c])
    steps.append(Step(a, op, b, c))
    a = c
  return steps


def render_solution(steps: Sequence[Step], answer: str | None = None) -> str:
  """The policy-format solution text (module docstring); `answer` defaults to the last step's result."""
  if not steps:
    raise ValueError("render_solution: a solution needs at least one step.")
  answer = str(steps[-1].c) if answer is None else answer
  body = "".join(f"Step {k}: {STEP_OPEN}{s.text()}{STEP_CLOSE}\n\n" for k, s in enumerate(steps, start=1))
  return f"{THINK_OPEN}{body}{THINK_CLOSE}{ANSWER_OPEN}\\boxed{{{answer}}}{ANSWER_CLOSE}"


def visible(text: str) -> str:
  """A solution as the chat layer decodes it (special tokens, here `<think>`/`</think>`, skipped), stripped."""
  return text.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()


def parse_steps(text: str) -> list[Step | None]:
  """Every `<step>...</step>` of a solution in order; None for a step whose content is not `a op b = c`."""
  out = []
  for m in _ANY_STEP_RE.finditer(text):
    s = _STEP_RE.fullmatch(m.group(0))
    out.append(Step(int(s.group(1)), s.group(2), int(s.group(3)), int(s.group(4))) if s else None)
  return out


def step_truth(problem: Problem, text: str) -> list[bool]:
  """Exact verdict of every written step of `text` (first-error convention); [] when it has no step.

  Step k is right iff it applies the problem's k-th operation to the right previous value and writes the
  right result, and every earlier step is right. Steps past the problem's operations are wrong.
  """
  values, truth, ok = problem.values, [], True
  for k, s in enumerate(parse_steps(text)):
    ok = ok and s is not None and k < len(problem.ops) and (s.a, s.op, s.b) == (values[k], *problem.ops[k]) \
        and s.c == values[k + 1]
    truth.append(ok)
  return truth


def first_error(truth: Sequence[bool]) -> int:
  """0-based index of the first False, -1 when all are True (the ProcessBench label)."""
  return next((i for i, t in enumerate(truth) if not t), -1)


def solution_is_correct(problem: Problem, text: str) -> bool:
  """Outcome truth: the extracted final answer equals the reference result (as an integer)."""
  answer = extract_answer(text)
  try:
    return answer is not None and int(answer.strip()) == problem.values[-1]
  except ValueError:
    return False


def process_complete(problem: Problem, text: str) -> bool:
  """Every step right, one step per operation, and the right answer: a solution with no error at all."""
  truth = step_truth(problem, text)
  return len(truth) == len(problem.ops) and all(truth) and solution_is_correct(problem, text)


# ------------------------------------------------------------------------------------------- verifications


def render_verification(problem: Problem, solution_text: str, verdicts: Sequence[bool], final: bool,
                        recomputed: Sequence[int | None] | None = None, check: str = "difference") -> str:
  """A teacher verification of `solution_text`: block k restates written step k as `a op b = c` (or says it
  is unreadable or extra), or, with the grader's own result r = `recomputed[k]`, checks it; then the marker of
  `verdicts[k]`; then the final line.

  check="difference" (the bootstrap's): `a op b = r; written c; c - r = d` with d = (c - r) mod the modulus,
  so the verdict is "d is 0" (and no earlier step judged wrong): a function of the one token before it. Each
  piece is a skill the generator already has (an operation's result, copying a written number, a
  subtraction in its own step syntax). check="written": `a op b = r; written c`, the verdict a comparison of
  two tokens; measured on world-small (2026-12-03): the verifier never learnt that comparison (its verdict
  probability stayed at the base rate, 0.69, whether r = c or not, after 1,500 steps), hence the difference.
  The world tokenizer's corpus is rendered with "written", so the tokenizer (and the generator trained on it)
  does not change with this choice."""
  if check not in CHECK_STYLES:
    raise ValueError(f"render_verification: check={check!r}; use one of {CHECK_STYLES}.")
  written = parse_steps(solution_text)
  if len(verdicts) != len(written) or not written:
    raise ValueError(f"render_verification: {len(verdicts)} verdicts for {len(written)} written steps "
                     "(need one per step).")
  if recomputed is not None and len(recomputed) != len(written):
    raise ValueError(f"render_verification: {len(recomputed)} recomputed results for {len(written)} steps.")
  blocks = []
  for k, s in enumerate(written):
    title = "an extra step" if k >= len(problem.ops) else ("an unreadable step" if s is None else s.text().strip())
    if recomputed is not None and recomputed[k] is not None and s is not None and k < len(problem.ops):
      # The grader's own result comes BEFORE the written one: with the written result just before it, a small
      # model learns to copy it instead of computing it, and judges every step correct.
      r = recomputed[k]
      title = f"{s.a} {s.op} {s.b}{CHECK_WORD} {r}; written {s.c}"
      if check == "difference":
        title += f"; {s.c} - {r}{CHECK_WORD} {(s.c - r) % problem.modulus}"
    blocks.append(f"## Step {k + 1}: {title}\n{step_marker(verdicts[k])}")
  return "\n\n".join(blocks) + "\n\n" + final_verdict_line(final)


def local_checks(problem: Problem, text: str) -> list[bool]:
  """Per written step, the check a grader can do on that step alone: it is readable, it is one of the
  problem's operations in order, it starts from the previous written result (the start value for step 1),
  and its arithmetic is right. `step_truth` is the running AND of these (a wrong step makes every later
  step wrong), up to one difference: a wrong result propagated correctly passes its own check."""
  checks, prev = [], problem.start
  for k, s in enumerate(parse_steps(text)):
    ok = s is not None and k < len(problem.ops) and (s.op, s.b) == problem.ops[k] and s.a == prev \
        and s.c == apply(s.op, s.a, s.b, problem.modulus)
    checks.append(ok)
    prev = s.c if s is not None else None
  return checks


def noisy_verification(problem: Problem, solution_text: str, rng: random.Random, step_accuracy: float,
                       check: str = "difference") -> str | None:
  """A verification by a grader that redoes each step's arithmetic and miscalculates with probability
  1 - `step_accuracy` (a uniformly drawn wrong result), independently per step. Its check of a step (the
  rest of `local_checks`, with its own result in place of the true one) is therefore right with probability
  at least `step_accuracy`; it follows the truth convention on its own checks: from the first step it judges
  wrong, every step is incorrect, and the final verdict is Yes iff it judged every step correct. None for a
  solution with no step.

  Every verdict is a function of text the verifier writes or reads next to it (the restated step, its own
  result, its earlier verdicts), so a small model can learn it, while the miscalculations keep the
  verifications of one solution partly independent (a false alarm or a missed error moves the judged first
  error): what self-consistency is meant to fix. With `step_accuracy=1` the verdicts are `step_truth`."""
  if not 0.0 <= step_accuracy <= 1.0:
    raise ValueError(f"step_accuracy={step_accuracy} is not a probability.")
  if not parse_steps(solution_text):
    return None
  verdicts, recomputed, ok, prev = [], [], True, problem.start
  for k, s in enumerate(parse_steps(solution_text)):
    if s is None or k >= len(problem.ops):
      recomputed.append(None)
      judged = False
    else:
      r = apply(s.op, s.a, s.b, problem.modulus)
      if rng.random() >= step_accuracy:
        r = rng.choice([v for v in range(problem.modulus) if v != r])
      recomputed.append(r)
      # the operation, the operand and the carried value are read off the text without error
      judged = (s.op, s.b) == problem.ops[k] and s.a == prev and s.c == r
    prev = s.c if s is not None else None
    ok = ok and judged
    verdicts.append(ok)
  return render_verification(problem, solution_text, verdicts, all(verdicts), recomputed, check)


def sample_step_error_solution(problem: Problem, rng: random.Random, step_error_rate: float) -> tuple[str, int]:
  """(policy-format text, first error index) whose every step writes a wrong result with probability
  `step_error_rate`, independently; each step starts from the previous written result.

  The verifier's training solutions: with a single injected error, copying a step's written result is the
  right "recomputation" for every step but one, so a small model learns to copy instead of to check; with
  independent errors copying is wrong at every wrong step."""
  if not 0.0 <= step_error_rate <= 1.0:
    raise ValueError(f"step_error_rate={step_error_rate} is not a probability.")
  steps, a = [], problem.start
  for op, b in problem.ops:
    c = apply(op, a, b, problem.modulus)
    if rng.random() < step_error_rate:
      c = rng.choice([v for v in range(problem.modulus) if v != c])
    steps.append(Step(a, op, b, c))
    a = c
  text = render_solution(steps)
  return text, first_error(step_truth(problem, text))


def sample_solution(problem: Problem, rng: random.Random, error_rate: float) -> tuple[str, int]:
  """(policy-format text, first error index) with an error injected at a uniform step w.p. `error_rate`."""
  fe = rng.randrange(len(problem.ops)) if rng.random() < error_rate else -1
  return render_solution(solve(problem, fe, rng)), fe


# ----------------------------------------------------------------------------------- files for the jobs


def write_problems(path: str, problems: Sequence[Problem]) -> str:
  """Stage I problem file: one {id, problem, answer, start, ops, modulus} row per line."""
  from spark_jax import io
  io.write_jsonl_atomic(path, [p.to_record() for p in problems])
  return path


def read_problems(path: str) -> dict[str, Problem]:
  from spark_jax import io
  return {p.problem_id: p for p in map(Problem.from_record, io.read_records(path, on_error="raise"))}


PROCESSBENCH_SPLIT = "world"


def processbench_cases(problems: Sequence[Problem], seed: int, error_fraction: float = 0.5) -> list[dict]:
  """ProcessBench-format cases {id, problem, steps, label, final_answer_correct, generator}: one per problem,
  an error injected at a uniform step with probability `error_fraction`.

  `steps[k]` is `<step>...</step>` (the last one followed by the answer) so that `render_steps` gives the
  exact decoded layout of a world solution: `Step 1: <step>...</step>\\n\\nStep 2: ...<answer>...`.
  """
  rng = random.Random(f"processbench:{seed}")
  cases = []
  for p in problems:
    fe = rng.randrange(len(p.ops)) if rng.random() < error_fraction else -1
    steps = solve(p, fe, rng)
    texts = [f"{STEP_OPEN}{s.text()}{STEP_CLOSE}" for s in steps]
    texts[-1] += f"\n\n{ANSWER_OPEN}\\boxed{{{steps[-1].c}}}{ANSWER_CLOSE}"
    cases.append({"id": p.problem_id, "problem": p.text, "steps": texts, "label": fe,
                  "final_answer_correct": steps[-1].c == p.values[-1], "generator": "spark_jax.world"})
  return cases


def blind_guess_scores(cases: Sequence[dict]) -> dict:
  """ProcessBench scores (percent) of the best predictor that never reads a solution: it knows the labels'
  distribution, says "no error" with probability q and otherwise names the most frequent first-error step,
  q chosen for the highest expected F1. The chance level a PRM's F1 must clear (a model that does not parse
  scores 0, below it). Keys as `evals.processbench.score`'s."""
  labels = [int(c["label"]) for c in cases]
  errors = [x for x in labels if x >= 0]
  n_error, n_correct = len(errors), len(labels) - len(errors)
  if not n_error or not n_correct:
    raise ValueError(f"blind_guess_scores: {n_error} erroneous and {n_correct} correct cases; need both.")
  share = max(errors.count(j) for j in set(errors)) / n_error
  best = (0.0, 0.0, 0.0)
  for i in range(1001):
    q = i / 1000
    acc_e, acc_c = (1 - q) * share, q
    f1 = 2 * acc_e * acc_c / (acc_e + acc_c) if acc_e + acc_c else 0.0
    best = max(best, (f1, acc_e, acc_c))
  f1, acc_e, acc_c = best
  return {"f1": 100 * f1, "acc_error": 100 * acc_e, "acc_correct": 100 * acc_c, "n": len(labels),
          "n_error": n_error, "n_correct": n_correct, "parse_failure_rate": 0.0}


def write_processbench(directory: str, cases: Sequence[dict], split: str = PROCESSBENCH_SPLIT) -> str:
  """Writes `<directory>/<split>.json`, loadable with `load_processbench(directory, splits=(split,))`."""
  from spark_jax import io
  os.makedirs(directory, exist_ok=True)
  io.write_text_atomic(os.path.join(directory, f"{split}.json"), json.dumps(list(cases), indent=1))
  return directory
