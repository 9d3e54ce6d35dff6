"""Answer equivalence: gold normalisation, string normalisation, and math_verify under a time bound.

`is_equivalent(pred, gold)` settles a pair by normalised string equality first (cheap, and it settles most
correct answers; the rules are in `normalize_answer`), then by math_verify with both sides parsed as `$…$`
(D11 in docs/method.md). In the main thread the math_verify part is bounded by a SIGALRM timer; elsewhere
run it in a `spark_jax.evals.grading_pool.GradingPool` worker, which also survives C code that no signal
interrupts.

Gold answers arrive as plain strings, numbers (AMC23 stores 27.0), lists, or the JSON-list strings of
the Skywork data ('["1156"]'); `normalize_gold` turns each into a list of strings, and a prediction is
correct when it matches any of them.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import re
import signal
import threading
import time
from typing import Any, Callable, Sequence

DEFAULT_TIMEOUT_S = 10.0

# A check function takes (prediction, gold strings, timeout in seconds) and returns correctness. It must be
# a module-level function so that spawned workers can unpickle it.
CheckFn = Callable[[str, list[str], float], bool]

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Gold answers and normalisation
# ---------------------------------------------------------------------------------------------------------


def _scalar_to_str(x: Any) -> str:
  """Numbers to their plain decimal text: 27.0 -> "27" (AMC23 stores integers as floats), 0.5 -> "0.5"."""
  if isinstance(x, bool):
    raise TypeError(f"gold answer {x!r} is a bool; expected a string or a number.")
  if isinstance(x, int):
    return str(x)
  if isinstance(x, float):
    if not math.isfinite(x):
      raise ValueError(f"gold answer {x!r} is not finite; fix the data row.")
    return str(int(x)) if x.is_integer() else repr(x)
  if isinstance(x, str):
    return x
  # numpy scalars (parquet columns) and other number-likes.
  if hasattr(x, "item"):
    return _scalar_to_str(x.item())
  raise TypeError(f"gold answer element {x!r} has type {type(x).__name__}; expected str, int or float.")


def normalize_gold(gt: Any) -> list[str]:
  """Turns a ground truth into a non-empty list of answer strings; a prediction may match any of them.

  Accepts a str, a number, a list/tuple/numpy array of those, or a JSON-list string as in the Skywork
  data ('["1156"]', also '["a", "b"]' for several accepted answers; a Python-literal list of strings
  "['2']" is read the same way). A bracketed string is only unwrapped when it parses to a list of
  *strings*: the interval "[0, 1]" parses to numbers and stays one answer.

  Raises:
    ValueError / TypeError naming the bad value when it is None, empty, or of an unsupported type.
  """
  if gt is None:
    raise ValueError("gold answer is None; every graded row needs a ground truth (check the data row).")
  if hasattr(gt, "tolist") and not isinstance(gt, str):  # numpy arrays from parquet.
    gt = gt.tolist()
  if isinstance(gt, (list, tuple)):
    out: list[str] = []
    for item in gt:
      out.extend(normalize_gold(item))
    if not out:
      raise ValueError(f"gold answer {gt!r} is an empty list; expected at least one answer.")
    return out
  s = _scalar_to_str(gt).strip()
  if s.startswith("[") and s.endswith("]"):
    parsed: Any = None
    try:
      parsed = json.loads(s)
    except ValueError:
      try:
        parsed = ast.literal_eval(s)
      except (ValueError, SyntaxError, MemoryError, RecursionError):
        parsed = None
    if isinstance(parsed, list) and parsed and all(isinstance(p, str) for p in parsed):
      return normalize_gold(parsed)
  if not s:
    raise ValueError(f"gold answer {gt!r} is empty; expected a non-empty answer string.")
  return [s]


_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[!,;:> ]")
_DEGREE_RE = re.compile(r"\^\s*\{?\\circ\}?")
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(.*)\}$")
_INT_FRACTION_RE = re.compile(r"^(-?\d+)/(\d+)$")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(s: str) -> str:
  """The string normalisation, used for the cheap equality check before math_verify.

  The rules of docs/method.md §2.3: remove newlines, `\\left`, `\\right` and spaces; `\\\\` -> `\\`; `lhs=rhs` with a
  left side of at most 3 characters keeps `rhs` ("x=5" -> "5"); `a/b` of integers -> `\\frac{a}{b}`.
  Additions (spellings that graders, math_verify included, treat as the same answer):
  surrounding `$`, `\\dfrac`/`\\tfrac` -> `\\frac`, LaTeX spacing commands, `^\\circ`, `\\%`, a whole-string
  `\\text{...}`, a final period, and thousands separators in plain numbers ("1,000" -> "1000").
  """
  s = s.replace("\n", "")
  s = _LEFT_RIGHT_RE.sub("", s)
  s = s.replace("\\\\", "\\")
  s = _SPACING_RE.sub("", s)
  s = s.replace(" ", "").replace("\t", "")
  s = s.strip("$")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = _DEGREE_RE.sub("", s)
  s = s.replace("\\%", "").replace("%", "")
  if s.endswith("."):
    s = s[:-1]
  m = _TEXT_WRAP_RE.match(s)
  if m and "}" not in m.group(1):
    s = m.group(1)
  if s.count("=") == 1:
    lhs, rhs = s.split("=")
    if len(lhs) <= 3 and rhs:
      s = rhs
  if _THOUSANDS_RE.match(s):
    s = s.replace(",", "")
  m = _INT_FRACTION_RE.match(s)
  if m:
    s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
  return s


_INT_RE = re.compile(r"^[-+]?\d{1,100}$")  # Bounded: int() refuses strings over 4,300 digits.


def quick_verdict(pred: str, golds: Sequence[str]) -> bool | None:
  """Settles a pair without math_verify when that is safe; None = ask math_verify.

  True on normalized string equality with any gold (the first test of docs/method.md §2.3). False when the prediction
  and every gold are plain integers after normalisation and differ in value: math_verify compares
  integers exactly, so the verdict is the same, and integer answers (AIME, AMC, GSM8K, most of the
  Skywork pool) are most of what RL grades. ("025" and "25" are equal here, as in math_verify.)
  """
  p = normalize_answer(pred)
  if not p:
    return None
  normalized = [normalize_answer(g) for g in golds]
  if any(p == n for n in normalized):
    return True
  if _INT_RE.match(p) and all(_INT_RE.match(n) for n in normalized):
    return any(int(p) == int(n) for n in normalized)
  return None


# ---------------------------------------------------------------------------------------------------------
# Equivalence with a time bound
# ---------------------------------------------------------------------------------------------------------


class _AnswerTimeout(BaseException):
  """Raised by our SIGALRM handler. A BaseException so that libraries' `except Exception` can't eat it."""


_TIMED_OUT = object()


def _call_with_time_limit(fn: Callable[[], Any], timeout_s: float | None) -> Any:
  """Runs `fn()`; returns `_TIMED_OUT` if it runs past `timeout_s` seconds.

  Uses a one-shot ITIMER_REAL/SIGALRM (sub-second precision), which only the main thread may install.
  Elsewhere, or with `timeout_s` None/<=0, `fn` runs unbounded: bound it by running it in a `GradingPool`
  worker instead. A SIGALRM timer and handler that were already installed (e.g. by pytest-timeout) are
  restored afterwards with their remaining time. A signal cannot interrupt C code that holds the GIL
  (huge integer powers, some regexes); the pool's hard kill covers that case.
  """
  if (
      timeout_s is None
      or timeout_s <= 0
      or not hasattr(signal, "setitimer")
      or threading.current_thread() is not threading.main_thread()
  ):
    return fn()

  state = {"armed": True}

  def handler(signum, frame):  # pylint: disable=unused-argument
    if state["armed"]:
      state["armed"] = False
      raise _AnswerTimeout()

  start = time.monotonic()
  old_handler = signal.signal(signal.SIGALRM, handler)
  old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
  restored = {"done": False}

  def disarm() -> None:
    state["armed"] = False
    if restored["done"]:
      return
    restored["done"] = True
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
    if old_delay > 0:
      remaining = max(old_delay - (time.monotonic() - start), 1e-6)
      signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)

  try:
    try:
      return fn()
    finally:
      disarm()
  except _AnswerTimeout:
    disarm()
    return _TIMED_OUT


_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _as_math(s: str) -> str:
  """Wraps an answer as `$…$` for math_verify unless it already carries math delimiters."""
  if _UNESCAPED_DOLLAR_RE.search(s) or "\\(" in s or "\\[" in s:
    return s
  return f"${s}$"


class _DropTimeoutDisabledWarning(logging.Filter):
  """Drops math_verify's "Timeout is disabled ..." warning: we do bound time, with our own timer."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Timeout is disabled")


_FILTER = _DropTimeoutDisabledWarning()


def math_verify_equal(pred: str, golds: Sequence[str]) -> bool:
  """math_verify equivalence, with math_verify's own signal timeouts off (the caller bounds time)."""
  from math_verify import verify  # pylint: disable=g-import-not-at-top  (slow import, ~1 s)

  for name in ("math_verify.grader", "math_verify.parser"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)

  pred_parsed = _parse(_as_math(pred))
  if not pred_parsed and _as_math(pred) != pred:
    # "18 dollars" parses as a product inside `$…$` but as 18 in plain text.
    pred_parsed = _parse(pred)
  if not pred_parsed:
    return False
  for g in golds:
    gold_parsed = _parse(_as_math(g))
    if gold_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
      return True
  return False


@functools.lru_cache(maxsize=8192)
def _parse(text: str) -> list[Any]:
  """math_verify.parse, memoised: RL grades 16 rollouts against one gold, and rollouts repeat answers.

  Only completed parses are cached (a timeout raises through), and verify does not mutate the parsed
  sympy objects, so sharing them is safe.
  """
  from math_verify import parse  # pylint: disable=g-import-not-at-top

  return parse(text, parsing_timeout=None)


def is_equivalent(pred: Any, gold: Any, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
  """Whether the extracted answer `pred` equals `gold` (any of its answers, see `normalize_gold`).

  Normalized string equality first (docs/method.md §2.3), then math_verify with both sides parsed as `$…$` (D11;
  a prediction that already holds `$`, `\\(` or `\\[` is parsed as is). math_verify's own signal.alarm
  timeouts are always switched off (`parsing_timeout=None`, `timeout_seconds=None`): they would clobber
  our timer and they fail outside the main thread. Instead the whole check is bounded by `timeout_s`
  with a SIGALRM timer when running in the main thread; in other threads it runs unbounded — use
  `grade_batch`/`GradingPool` there (its workers run checks in their main thread and are killed when
  they overrun). A timeout, a parse failure or any math_verify error counts as not equivalent.

  Args:
    pred: the extracted answer (see `extract_answer`); None or empty is never correct.
    gold: the ground truth, in any form `normalize_gold` accepts.
    timeout_s: seconds for the math_verify part; None or <= 0 = no bound.
  """
  golds = normalize_gold(gold)
  if pred is None:
    return False
  pred = str(pred).strip()
  if not pred:
    return False
  quick = quick_verdict(pred, golds)
  if quick is not None:
    return quick
  # Import math_verify (and sympy under it) before the timer starts: a first import can take seconds (longer in
  # a fresh environment that compiles its bytecode), and a SIGALRM landing inside it leaves sympy half
  # initialised in sys.modules, after which every later check in the process fails ("module 'sympy' has no
  # attribute 'printing'") and is silently graded wrong.
  import math_verify  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  try:
    result = _call_with_time_limit(lambda: math_verify_equal(pred, golds), timeout_s)
  except Exception:  # pylint: disable=broad-except  (a grader error is a wrong answer, never a crash)
    _log.debug("math_verify failed on pred=%r gold=%r", pred, golds, exc_info=True)
    return False
  return result is True


def default_check(pred: str, golds: list[str], timeout_s: float) -> bool:
  """The check `GradingPool` workers run by default: `is_equivalent` under the worker's soft timer."""
  return is_equivalent(pred, golds, timeout_s=timeout_s)
