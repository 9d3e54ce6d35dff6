"""The embedded world: task exactness, solution/verification formats against the project's parsers, the
ProcessBench-style set through the unchanged loader and renderer, and the tokenizer."""

import itertools
import random

import pytest

from spark_jax.evals import processbench as pb
from spark_jax.stage1 import prompts
from spark_jax.text import verdicts
from spark_jax.text.answers import extract_answer
from spark_jax.world import task
from spark_jax.world import tokenizer as world_tokenizer


def test_problems_are_deterministic_and_bounded():
  a, b = task.make_problems(3, 50), task.make_problems(3, 50)
  assert a == b and a != task.make_problems(4, 50)
  for p in a:
    assert 3 <= len(p.ops) <= 6 and all(0 <= v < p.modulus for v in p.values)
    assert task.Problem.from_record(p.to_record()) == p
  p = task.Problem("x", 7, (("+", 5), ("*", 3), ("-", 4)), 10)
  assert p.values == [7, 2, 6, 2] and p.answer == "2"


@pytest.mark.parametrize("first_error", [-1, 0, 1, 2])
def test_injected_error_is_exactly_the_first_wrong_step(first_error):
  p = task.Problem("x", 7, (("+", 5), ("*", 3), ("-", 4)), 10)
  text = task.render_solution(task.solve(p, first_error, random.Random(first_error)))
  truth = task.step_truth(p, text)
  assert len(truth) == 3 and task.first_error(truth) == first_error
  assert truth == [first_error == -1 or k < first_error for k in range(3)]  # errors propagate
  assert task.solution_is_correct(p, text) == (first_error == -1)
  assert task.process_complete(p, text) == (first_error == -1)


def test_step_truth_of_malformed_and_extra_steps():
  p = task.Problem("x", 7, (("+", 5), ("*", 3)), 10)
  assert task.step_truth(p, "no steps at all") == []
  # The wrong operand in step 1 makes both steps wrong though step 2's own arithmetic is right.
  text = "Step 1: <step>7 + 4 = 1</step>\n\nStep 2: <step>1 * 3 = 3</step>\n\nStep 3: <step>3 + 1 = 4</step>"
  assert task.step_truth(p, text) == [False, False, False]
  text = "Step 1: <step>7 + 5 = 2</step>\n\nStep 2: <step>garbled</step>"
  assert task.step_truth(p, text) == [True, False]


def test_solution_format_answer_and_visible_text():
  p = task.make_problems(0, 1)[0]
  text = task.render_solution(task.solve(p))
  assert text.startswith("<think>Step 1: <step>") and text.endswith(f"</think><answer>\\boxed{{{p.answer}}}</answer>")
  assert text.count("<step>") == len(p.ops)
  seen = task.visible(text)
  assert "<think>" not in seen and verdicts.strip_thinking(seen) == seen  # Stage I keeps the steps
  assert extract_answer(seen) == extract_answer(text) == p.answer
  assert task.step_truth(p, seen) == [True] * len(p.ops)


def test_noisy_verifications_follow_the_convention_on_their_own_judgments():
  rng = random.Random(0)
  judged_first = true_first = total = 0
  for p in task.make_problems(1, 300):
    text, _ = task.sample_solution(p, rng, error_rate=0.5)
    truth = task.step_truth(p, text)
    assert truth == list(itertools.accumulate(task.local_checks(p, text), lambda a, b: a and b))
    exact = verdicts.parse_verification(task.noisy_verification(p, text, rng, step_accuracy=1.0))
    assert exact == {"steps": truth, "final": all(truth)}
    noisy = verdicts.parse_verification(task.noisy_verification(p, text, rng, step_accuracy=0.8))
    steps = noisy["steps"]
    assert len(steps) == len(truth) and noisy["final"] == all(steps)
    assert all(not b for a, b in zip(steps, steps[1:]) if not a)  # incorrect from the judged first error on
    judged_first += task.first_error(steps) == task.first_error(truth)
    total += 1
  # The judged first error is right iff every check up to it is right: 0.8^(k+1) with k the true index
  # (or the whole chain when there is none); for 2-4 operations that is between 0.33 and 0.8.
  assert 0.4 < judged_first / total < 0.75


def test_verification_restates_each_written_step_before_its_verdict():
  p = task.Problem("x", 7, (("+", 5), ("*", 3)), 10)
  text = "Step 1: <step> 7 + 5 = 3</step>\n\nStep 2: <step>garbled</step>\n\nStep 3: <step> 1 + 1 = 2</step>"
  verification = task.render_verification(p, text, [False, False, False], False)
  assert verification.startswith("## Step 1: 7 + 5 = 3\n**This step is incorrect.**")
  assert "## Step 2: an unreadable step\n" in verification and "## Step 3: an extra step\n" in verification
  with pytest.raises(ValueError, match="2 verdicts for 3 written steps"):
    task.render_verification(p, text, [False, False], False)
  # The teacher grader recomputes (here without miscalculating), states its result before the written one,
  # and subtracts them modulo 10, so the verdict follows from the difference (and the earlier verdicts).
  right = "Step 1: <step> 7 + 5 = 2</step>\n\nStep 2: <step> 2 * 3 = 6</step>"
  wrong = "Step 1: <step> 7 + 5 = 3</step>\n\nStep 2: <step> 3 * 3 = 9</step>"
  assert task.noisy_verification(p, right, random.Random(0), 1.0).startswith(
      "## Step 1: 7 + 5 = 2; written 2; 2 - 2 = 0\n**This step is correct.**\n\n"
      "## Step 2: 2 * 3 = 6; written 6; 6 - 6 = 0\n")
  assert task.noisy_verification(p, wrong, random.Random(0), 1.0) == (
      "## Step 1: 7 + 5 = 2; written 3; 3 - 2 = 1\n**This step is incorrect.**\n\n"
      "## Step 2: 3 * 3 = 9; written 9; 9 - 9 = 0\n**This step is incorrect.**\n\n"
      "**Verification: Is the answer correct (Yes/No)? No**")
  # The other layout (the tokenizer corpus's): no difference; an unknown one is an error.
  assert task.noisy_verification(p, wrong, random.Random(0), 1.0, check="written").startswith(
      "## Step 1: 7 + 5 = 2; written 3\n**This step is incorrect.**")
  with pytest.raises(ValueError, match="check='sum'"):
    task.noisy_verification(p, wrong, random.Random(0), 1.0, check="sum")
  # Wrap-around: 1 - 8 is 3 modulo 10, not -7.
  assert "; written 1; 1 - 8 = 3\n" in task.noisy_verification(
      task.Problem("y", 4, (("*", 2),), 10), "Step 1: <step> 4 * 2 = 1</step>", random.Random(0), 1.0)


def test_processbench_cases_load_and_render_like_a_solution(tmp_path):
  problems = task.make_problems(9, 40)
  cases = task.processbench_cases(problems, seed=9)
  assert {c["label"] == -1 for c in cases} == {True, False}
  task.write_processbench(str(tmp_path), cases)
  loaded = pb.load_processbench(str(tmp_path), splits=(task.PROCESSBENCH_SPLIT,))
  assert [c["label"] for c in loaded] == [c["label"] for c in cases]
  for p, case in zip(problems, loaded):
    fe = case["label"]
    text = task.render_solution(task.solve(p, fe, random.Random(0)))
    rendered = pb.render_steps(case["steps"])
    assert task.first_error(task.step_truth(p, rendered)) == fe
    if fe == -1:  # the rendering is byte for byte the decoded solution the verifier and the PRM see
      assert rendered == task.visible(text)


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
  from spark_jax.tokenizer import Tokenizer
  assert world_tokenizer.build_tokenizer_json() == world_tokenizer.build_tokenizer_json()
  tok = Tokenizer.from_pretrained(world_tokenizer.build_tokenizer(str(tmp_path / "tok")))
  assert tok.vocab_size <= world_tokenizer.WORLD_VOCAB
  assert tok.decode(tok.end_of_turn_ids[:1]) == "<|im_end|>"
  p = task.make_problems(2, 1)[0]
  solution = task.render_solution(task.solve(p, 1, random.Random(1)))
  verification = task.noisy_verification(p, solution, random.Random(1), 0.8)
  for text in (p.text, solution, verification, prompts.verifier_prompt(p.text, task.visible(solution), "3")):
    assert tok.decode(tok.encode(text)) == text
  # The chat layer decodes with special tokens skipped: the think markers vanish, the step tags stay.
  assert tok.decode(tok.encode(solution), skip_special_tokens=True) == solution.replace("<think>", "").replace(
      "</think>", "")
  # Constant prompt prose is one token per segment, so a verifier prompt stays short.
  messages = [{"role": "user", "content": prompts.verifier_prompt(p.text, task.visible(solution))},
              {"role": "assistant", "content": verification}]
  ids, mask = tok.render_chat_with_assistant_mask(messages)
  assert len(ids) < 400 and 0 < sum(mask) < len(ids)
  assert len(tok.token_bytes_table()) == tok.vocab_size
  # Copying is a plain token copy: every number of the problem is one token, and the same token in the solution's
  # steps and the verification's restated steps (a tiny model that must map " 7" to "7" first learns slowly).
  numbers = {str(v) for v in range(p.modulus)}
  for text in (p.text, solution.split(task.ANSWER_OPEN)[0], verification):
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert all(piece == " " + piece.strip() for piece in pieces if piece.strip() in numbers), pieces
  assert {" " + n for n in numbers} <= {tok.decode([i]) for i in tok.encode(" ".join(sorted(numbers)) + " 0")}


def test_label_accuracy_of_variants_on_synthetic_stage1_files(tmp_path):
  """report.label_accuracy on Stage I files written from the task itself: graders that miscalculate a step
  w.p. 0.1, independently, and mark every step after their first judged error incorrect; a single
  verification labels ~89% of the steps right (a false alarm also condemns the later steps), the step
  majority of 9 more (fixed seed: 88.8 vs 94.2)."""
  from spark_jax import io
  from spark_jax.world import report
  rng = random.Random(0)
  problems = task.make_problems(11, 60)
  task.write_problems(str(tmp_path / "problems.jsonl"), problems)
  solutions, verifications, references = [], [], []
  for p in problems:
    text, _ = task.sample_solution(p, rng, error_rate=0.5)
    sid = f"{p.problem_id}-s0"
    solutions.append({"problem_id": p.problem_id, "problem": p.text, "answer": p.answer, "solution_id": sid,
                      "solution": task.visible(text), "is_correct": task.solution_is_correct(p, text)})
    verifications.append({"solution_id": sid, "verifications": [
        task.noisy_verification(p, text, rng, 0.9) for _ in range(9)]})
    references.append({"solution_id": sid, "verifications": [
        task.noisy_verification(p, text, rng, 1.0) for _ in range(3)]})
  io.write_jsonl_atomic(str(tmp_path / "generate" / "solutions.jsonl"), solutions)
  io.write_jsonl_atomic(str(tmp_path / "verify" / "verifications-00000.jsonl"), verifications)
  io.write_jsonl_atomic(str(tmp_path / "verify_reference" / "verifications-00000.jsonl"), references)
  table = report.label_accuracy(str(tmp_path), n_grid=(1, 9))
  v = table["variants"]
  assert table["solutions"] == 60 and table["unlabelable"] == 0
  assert 0.8 < v["single"][9]["step_accuracy"] < 0.95 and v["single"][1] == v["single"][9]
  assert v["step_consistency"][1]["step_accuracy"] == v["single"][1]["step_accuracy"]
  assert v["step_consistency"][9]["step_accuracy"] > v["single"][9]["step_accuracy"] + 0.03
  assert v["reference_guided"][9]["step_accuracy"] == 1.0 and v["reference_guided"][9]["first_error_accuracy"] == 1.0


def test_step_error_solutions_make_copying_the_written_result_a_bad_check():
  """Verifier training solutions: independent per-step errors, each step starting from the written result, so
  the arithmetic is wrong at ~25% of the steps (a grader that copies the written result misses all of them)."""
  rng = random.Random(3)
  wrong = total = 0
  for p in task.make_problems(5, 400, task.TaskConfig(modulus=5, min_ops=2, max_ops=4, max_operand=4)):
    text, fe = task.sample_step_error_solution(p, rng, 0.25)
    steps = task.parse_steps(text)
    assert len(steps) == len(p.ops) and fe == task.first_error(task.step_truth(p, text))
    assert steps[0].a == p.start and all(s.a == prev.c for prev, s in zip(steps, steps[1:]))
    wrong += sum(s.c != task.apply(s.op, s.a, s.b, p.modulus) for s in steps)
    total += len(steps)
  assert 0.21 < wrong / total < 0.29, wrong / total  # ~1200 Bernoulli(0.25) draws: 5 sigma is 0.063


def test_blind_guess_is_the_best_f1_without_reading_the_solution():
  # Errors at step 0 twice and step 2 once, two correct cases: the guess names step 0 when it guesses an error.
  cases = [{"label": x} for x in (0, 0, 2, -1, -1)]
  s = task.blind_guess_scores(cases)
  share = 2 / 3
  best = max(2 * (1 - q / 1000) * share * (q / 1000) / ((1 - q / 1000) * share + q / 1000) for q in range(1, 1000))
  assert s["f1"] == pytest.approx(100 * best, abs=1e-6) and (s["n"], s["n_error"], s["n_correct"]) == (5, 3, 2)
  assert 0 < s["f1"] < 100 * share  # below a perfect error-step guess, above nothing
  with pytest.raises(ValueError, match="0 erroneous and 2 correct"):
    task.blind_guess_scores([{"label": -1}] * 2)
