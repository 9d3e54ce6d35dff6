"""Host reward rules: the format gate, truncation, policy steps, verdict extraction, every reward type."""

import pytest

from spark_jax.rl import rewards as R

GOOD = "<think><step>a</step><step>b</step></think>\n<answer>\\boxed{42}</answer>"


@pytest.mark.parametrize("text, ok", [
    (GOOD, True),
    (GOOD + " \n\t", True),  # trailing whitespace is allowed
    (GOOD + "\nMore problems: 1+1=2", False),  # solution appending
    (GOOD + "\xa0", False),  # non-ASCII whitespace counts as text
    (GOOD.replace("\\boxed{42}", "\\boxed{4}\\boxed{2}"), False),  # two boxes
    (GOOD.replace("\\boxed{42}", "\\\\boxed{42}"), False),  # a literal double backslash counts twice
    (GOOD.replace("\\boxed{42}", "\\boxed{\\frac{1}{2}}"), True),  # one opener, nested braces
    (GOOD.replace("\\boxed{42}", "\\boxed{\\boxed{1}}"), False),  # nested openers both count
    (GOOD.replace("\\boxed{42}", "\\boxed{4\n2}"), False),  # a box must close on its line
    (GOOD.replace("\\boxed{42}", "42"), False),  # no box
    ("<answer>\\boxed{1}</answer><answer>x</answer>", False),  # two answer pairs
    ("</answer><answer>\\boxed{1}", False),  # wrong order
    ("<answer>\\boxed{1}", False),  # unclosed
    ("\\boxed{1}<answer>x</answer>", True),  # the box need not be inside the answer
    ("<ANSWER>\\boxed{1}</ANSWER>", False),  # tags are case-sensitive
])
def test_format_gate(text, ok):
  assert R.format_ok(text) is ok


def test_count_boxes_and_text_after_answer():
  assert R.count_boxes("\\boxed{1} and \\\\boxed{2}") == 3
  assert R.text_after_answer("<answer>x</answer> y") and not R.text_after_answer("<answer>x</answer>\n")
  assert not R.text_after_answer("no tags here")


def test_truncate_after_answer():
  assert R.truncate_after_answer(GOOD + "\n\nappended") == GOOD
  assert R.truncate_after_answer("a</answer>b</answer>c") == "a</answer>b</answer>"
  assert R.truncate_after_answer("no answer") == "no answer"


def test_policy_step_spans():
  text = "<think><step>a</step>\n<STEP n=2>b</think><answer>x</answer><step>c\n"
  spans = R.policy_step_spans(text)
  assert [text[s:e] for s, e in spans] == ["<step>a</step>\n", "<STEP n=2>b", "<step>c"]
  assert R.policy_step_spans("Step 1: no tags") == []  # no fallbacks


def test_step_end_tokens():
  table = [b"<step>", b"ab", b"c", b"</think>", b"\n", b"<|end|>"]
  # "<step>" "ab" <special> "c" "</think>": the body "abc" ends in token 3; the special token spells nothing.
  assert R.step_end_tokens(table, [0, 1, 5, 2, 3], special_ids=[5]) == [3]
  assert R.step_end_tokens(table, [0, 1, 0, 2, 4]) == [1, 3]  # the last step ends before the final newline


def test_verdicts_via_text_parsers():
  cot = ("## Step 1: x\n**This step is correct.**\n## Step 2: y\n**THIS STEP IS INCORRECT.**\n"
         "**Verification: Is the answer correct (Yes/No)? No**")
  assert R.step_verdicts("prm_cot", cot) == [True, False]
  assert R.final_verdict("prm_cot", cot) is False
  prm = "Step 1: Correct\nStep 2: Correct\nStep 3: Incorrect\n**Verification: Is the answer correct (Yes/No)? Yes**"
  assert R.step_verdicts("prm", prm) == [True, True, False]
  assert R.final_verdict("prm", prm) is True
  assert R.final_verdict("orm", " yes\n") is True and R.final_verdict("orm", "Yes.") is None
  assert R.step_verdicts("prm_cot", "<think>**This step is correct.**</think>**This step is incorrect.**") == [False]
  with pytest.raises(ValueError, match="unknown reward-model format 'cot'"):
    R.step_verdicts("cot", "")


def test_registry_and_prompt_bug_knob():
  assert set(R.REWARD_TYPES) == {"orm", "prm_outcome", "prm_cot_outcome", "prm_step_avg", "prm_cot_step_avg",
                                 "selective_advantage", "selective_advantage_half", "global_step",
                                 "global_step_no_penalty", "random", "rlvr"}
  with pytest.raises(ValueError, match="reward type 'prm_cot' does not exist; use one of"):
    R.reward_type("prm_cot")
  sel = R.reward_type("selective_advantage")
  assert sel.prompt_format() == "prm_cot" and sel.prompt_format(orm_prompt_bug=True) == "orm"
  assert sel.output_format == "prm_cot"
  assert R.reward_type("prm_cot_outcome").prompt_format(orm_prompt_bug=True) == "prm_cot"
  assert R.reward_type("global_step_no_penalty").prompt_format(orm_prompt_bug=True) == "prm_cot"


COT_YES = ("**This step is correct.**\n**This step is incorrect.**\n"
           "**Verification: Is the answer correct (Yes/No)? Yes**")


@pytest.mark.parametrize("name, rm_output, want", [
    ("prm_cot_outcome", COT_YES, 1.0),
    ("prm_cot_step_avg", COT_YES, 0.4 * 0.5 + 0.6),
    ("prm_step_avg", "Step 1: Correct\nIs the answer correct? No", 0.4),
    ("prm_step_avg", "Is the answer correct? Yes", 0.6),  # no step lines: the step part is 0
    ("orm", "Yes", 1.0),
    ("orm", "Yes, it is.", 0.0),
    ("prm_outcome", "nothing parseable", 0.0),
])
def test_rm_reward(name, rm_output, want):
  assert R.rm_reward(name, rm_output) == pytest.approx(want)
  assert R.host_reward(name, GOOD, rm_output).reward == pytest.approx(want)
  assert R.host_reward(name, GOOD + " appended", rm_output).reward == 0.0  # the gate


def test_selective_strict_penalty_uses_policy_step_count():
  few = R.host_reward("selective_advantage", GOOD, COT_YES)  # 2 policy steps < 4 with PRM verdicts
  assert few.reward == 0.0 and few.policy_steps == 2 and few.prm_steps == (True, False)
  many = GOOD.replace("<step>a</step>", "<step>a</step>" * 3)
  assert R.host_reward("selective_advantage", many, COT_YES).reward == 1.0
  assert R.host_reward("selective_advantage", GOOD, "Is the answer correct? Yes").reward == 1.0  # no verdicts
  assert R.host_reward("global_step", GOOD, COT_YES).reward == 1.0  # no strict penalty there


def test_random_and_rlvr():
  assert R.host_reward("random", GOOD, coin=True).reward == 1.0
  assert R.host_reward("random", GOOD + "x", coin=True).reward == 0.0
  with pytest.raises(ValueError, match="coin="):
    R.host_reward("random", GOOD)
  appended = GOOD + "\nextra"
  assert R.host_reward("rlvr", appended, ground_truth="42").reward == 1.0  # ungated by default (D12)
  assert R.host_reward("rlvr", appended, ground_truth="42", rlvr_gate=True).reward == 0.0
  assert R.host_reward("rlvr", GOOD, ground_truth="41").reward == 0.0
