"""Answer grading: extraction, normalisation, gold handling, equivalence and the hang-proof pool."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import numpy as np
import pytest

from spark_jax.evals import grading as g

# ----------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
    ("sets: \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("final \\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),  # Unclosed last box is skipped.
    ("\\fbox{7}", "7"),
    ("thus $\\boxed 5$", "5"),
    ("\\boxed {12}", "12"),
    ("\\boxed{}", ""),
    ("nothing here", None),
    ("", None),
    (None, None),
])
def test_last_boxed(text, expected):
  assert g.last_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    # Rule 2: last boxed, nested braces.
    ("We get $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
    # Rule 1: the first `Answer:` line wins over a later box (docs/method.md §2.3 order), case-insensitive.
    ("Work...\nanswer: 42\nmore text \\boxed{41}", "42"),
    ("Answer: 7\nAnswer: 8", "7"),
    # Answer line holding a box, emphasis and `$`.
    ("**Final Answer:** The final answer is $\\boxed{5}$", "5"),
    ("Final Answer: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    # An empty `Answer:` capture falls through to the box on a later line.
    ("**Final Answer:**\n\\[\\boxed{3}\\]", "3"),
    # Think stripping: answers inside the reasoning trace do not count.
    ("<think>maybe \\boxed{1}? Answer: 1</think>The result is \\boxed{2}.", "2"),
    ("<think>Answer: 9</think>\nNo final answer given, sorry", None),
    # Rule 3: short last line with a math marker.
    ("Let me compute.\nx = 14", "x = 14"),
    ("Let me compute.\nthe value is fourteen", None),
    ("Some text\n" + "y = " + "1" * 60, None),  # Too long for rule 3.
    (None, None),
])
def test_extract_answer(text, expected):
  assert g.extract_answer(text) == expected


# ----------------------------------------------------------------------------------------------------
# Gold answers and normalisation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gt, expected", [
    ("1156", ["1156"]),
    ('["1156"]', ["1156"]),  # Skywork's JSON-list string.
    ('["\\\\frac{1}{2}", "0.5"]', ["\\frac{1}{2}", "0.5"]),
    ("['2']", ["2"]),  # Python-literal list.
    (["3", 4], ["3", "4"]),
    (27.0, ["27"]),  # AMC23 floats.
    (0.25, ["0.25"]),
    (np.array(['["12"]'], dtype=object), ["12"]),  # parquet cell
    ("[0, 1]", ["[0, 1]"]),  # An interval stays one answer.
    ("(0, 1]", ["(0, 1]"]),
    ("  7 ", ["7"]),
])
def test_normalize_gold(gt, expected):
  assert g.normalize_gold(gt) == expected


@pytest.mark.parametrize("gt", [None, [], "", "  ", True])
def test_normalize_gold_rejects(gt):
  with pytest.raises((ValueError, TypeError)):
    g.normalize_gold(gt)


@pytest.mark.parametrize("a, b", [
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("x = 5", "5"),
    ("3/4", "\\frac{3}{4}"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("90^\\circ", "90"),
    ("$1,000$", "1000"),
    ("\\text{Evelyn}", "Evelyn"),
    ("10\\%", "10"),
])
def test_normalize_answer_equal(a, b):
  assert g.normalize_answer(a) == g.normalize_answer(b)


def test_normalize_answer_keeps_long_lhs():
  assert g.normalize_answer("f(x)=2x") == "f(x)=2x"  # lhs longer than 3 characters is kept.


# ----------------------------------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred, gold, expected", [
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac12", True),
    ("1156", '["1156"]', True),
    ("27", 27.0, True),
    ("336", "336^\\circ", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("[0,1]", "[0, 1]", True),
    ("(0,1]", "[0,1]", False),
    ("2", "3", False),
    ("2", '["3", "2"]', True),  # Any of several gold answers.
    (None, "3", False),
    ("", "3", False),
    ("x^2+2x+1", "(x+1)^2", True),
])
def test_is_equivalent(pred, gold, expected):
  assert g.is_equivalent(pred, gold) is expected


def test_is_equivalent_soft_timeout_in_main_thread_restores_timer():
  sentinel = []
  previous = signal.signal(signal.SIGALRM, lambda *a: sentinel.append(1))
  try:
    t0 = time.monotonic()
    # sympy spends >10 s on this; the SIGALRM bound ends it after 0.5 s and it counts as wrong.
    assert g.is_equivalent("10^{10^{7}}", "1", timeout_s=0.5) is False
    assert time.monotonic() - t0 < 3.0
    assert signal.getsignal(signal.SIGALRM) is not None and sentinel == []
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
  finally:
    signal.signal(signal.SIGALRM, previous)


def test_is_equivalent_off_main_thread():
  # math_verify's own signal timeouts would raise here; we pass None and the check still works.
  with concurrent.futures.ThreadPoolExecutor(1) as ex:
    assert ex.submit(g.is_equivalent, "\\frac{1}{2}", "0.5", 1.0).result() is True
    assert ex.submit(g.is_equivalent, "025", "25").result() is True


def test_a_timeout_on_the_first_check_does_not_break_later_checks():
  # The first check in a process imports math_verify and sympy (0.3 s here, seconds in a fresh environment that
  # compiles its bytecode). A timer firing inside that import left sympy half initialised, and every later check
  # in the process was graded wrong (before the fix: timeouts of 0.05-0.2 s broke it on this machine). Fresh
  # interpreters, one per first-check timeout, so that one of them lands inside the import wherever it is slow.
  import subprocess
  import sys
  code = r"""
import sys
from spark_jax.evals import equivalence as e
assert "sympy" not in sys.modules
e.is_equivalent(r"\sqrt{4}", "2", timeout_s=float(sys.argv[1]))
print(e.is_equivalent(r"\sqrt{4}", "2", timeout_s=60.0))
import sympy
print(hasattr(sympy, "printing"))
"""
  for first_timeout in ("0.02", "0.05", "0.1", "0.2", "0.4", "1.0"):
    out = subprocess.run([sys.executable, "-c", code, first_timeout], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (first_timeout, out.stderr[-2000:])
    assert out.stdout.split() == ["True", "True"], (first_timeout, out.stdout, out.stderr[-2000:])


# ----------------------------------------------------------------------------------------------------
# Pool
# ----------------------------------------------------------------------------------------------------

HANG = "<hang>"


def check_or_hang(pred: str, golds: list[str], timeout_s: float) -> bool:
  """Like the default check, but `<hang>` blocks SIGALRM and sleeps: C code no signal can interrupt."""
  if pred == HANG:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(3600)
  return g.default_check(pred, golds, timeout_s)


@pytest.fixture(scope="module")
def pool():
  with g.GradingPool(num_workers=2, timeout_s=1.0, kill_grace_s=1.0, check_fn=check_or_hang) as p:
    yield p


def _cases():
  """~50 (pred, gold, expected) triples, including a slow answer and a hanging one."""
  cases = []
  for k in range(1, 16):
    cases.append((str(k * k), str(k * k), True))  # fast path
    cases.append((f"\\frac{{{k}}}{{2}}", str(k / 2), True))  # math_verify
    cases.append((str(k + 1), f'["{k}"]', False))  # wrong
  cases += [
      ("10^{10^{7}}", "1", False),  # slow in sympy: ended by the worker's soft timer
      (HANG, "1", False),  # uninterruptible: the worker is killed
      (None, "5", False),
      ("x = 5", "5", True),
      ("\\sqrt{8}", "2\\sqrt{2}", True),
  ]
  return cases


def test_pool_in_order_with_timeouts(pool):
  cases = _cases()
  assert len(cases) == 50
  preds, golds, expected = map(list, zip(*cases))
  t0 = time.monotonic()
  results = pool.grade(preds, golds)
  elapsed = time.monotonic() - t0
  assert results == expected
  stats = pool.last_stats
  assert stats["n"] == 50 and stats["killed"] == 1 and stats["crashes"] == 0
  assert stats["soft_timeouts"] >= 1
  assert stats["quick"] >= 15
  # Worker start (~1-2 s) + one soft timeout (1 s) + one hard kill (2 s) + ~35 quick checks.
  assert elapsed < 20.0, stats

  # The killed worker was replaced; the pool keeps working and the hang is bounded again.
  again = pool.grade([HANG, "4", "\\frac{2}{4}"], ["1", "4", "0.5"])
  assert again == [False, True, True]
  assert pool.last_stats["killed"] == 1


def test_grade_batch_on_a_pool_keeps_the_pools_timeout(pool):
  # The run configures the limit once, on its pool (config.grading_timeout_s); grade_batch must not replace
  # it with the module default (10 s) when the caller passes none.
  assert pool.timeout_s < g.DEFAULT_TIMEOUT_S
  t0 = time.monotonic()
  assert g.grade_batch(["10^{10^{7}}"], ["1"], pool=pool) == [False]
  assert pool.last_stats["soft_timeouts"] == 1
  assert time.monotonic() - t0 < pool.timeout_s + pool.kill_grace_s + 2.0


def test_pool_extract_and_errors(pool):
  responses = ["... so \\boxed{12}", "<think>\\boxed{3}</think> Answer: 4", "no answer"]
  assert pool.grade(responses, ["12", "3", "1"], extract=True) == [True, False, False]
  with pytest.raises(ValueError, match="2 predictions but 1 gold"):
    pool.grade(["1", "2"], ["1"])
  with pytest.raises(ValueError, match=r"golds\[1\]"):
    pool.grade(["1", "2"], ["1", None])


def test_grade_batch_in_process():
  assert g.grade_batch(["\\frac{1}{2}", "3", None], ["0.5", '["4"]', "1"], num_workers=0) == [
      True, False, False]
  assert g.grade_responses(["\\boxed{0.5}"], ["\\frac{1}{2}"], num_workers=0) == [True]


def test_pool_rejects_fork():
  with pytest.raises(ValueError, match="must not fork"):
    g.GradingPool(start_method="fork")
