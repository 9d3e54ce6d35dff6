"""The reward-model prompt built from ids: host and graph give the same ids, they decode to the prompt text, and
the SFT rows train the PRM on those ids."""

import jax
import numpy as np
import pytest

from spark_jax.rl import automata
from spark_jax.rl import prm_prompt
from spark_jax.text import rm_ids
from spark_jax.rl.rewards import format_ok, truncate_after_answer
from spark_jax.stage1 import aggregate, formats
from spark_jax.text.rm import RM_FORMATS, rm_prompt
from spark_jax.tokenizer import Tokenizer
from spark_jax.train import data as data_lib

PROBLEMS = ["Compute 3 + 4 * 2.", "12 - 5 = ?", "Find x if 2x = 10\nand x > 0"]
RESPONSES = ["<think><step>4 * 2 = 8</step><step>3 + 8 = 11</step></think><answer>\\boxed{11}</answer>",
             "<think><step>12 - 5 = 7</step></think><answer>\\boxed{7}</answer>\n\nextra text",
             "no answer tag at all",
             "<answer>\\boxed{5}</answer> <answer>\\boxed{6}</answer>\n",
             "<think><step>x = 5</step></think>\n<answer>\\boxed{5}</answer>",
             "<answer>\\boxed{5}</answer>"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  from spark_jax.world import tokenizer as world_tokenizer
  return Tokenizer.from_pretrained(world_tokenizer.build_tokenizer(str(tmp_path_factory.mktemp("world_tok"))))


@pytest.mark.parametrize("fmt", ["prm_cot", "orm"])
def test_ids_decode_to_the_chat_rendered_prompt(tok, fmt):
  for problem, solution in zip(PROBLEMS, RESPONSES):
    ids = rm_ids.rm_prompt_ids(tok, fmt, problem, solution)
    text = tok.apply_chat_template([{"role": "user", "content": rm_prompt(fmt, problem, solution)}], tokenize=False)
    assert tok.decode(ids) == text
    assert rm_ids.rm_prompt_ids(tok, fmt, problem, tok.encode(solution)) == ids  # ids in = text in


def test_graph_packing_equals_host_ids(tok):
  """Responses enter cut after their last `</answer>` and without special tokens (the world's `<think>` and
  `</think>` are special): what Stage I's decoded solutions, the PRM's training inputs, look like."""
  G = 2
  fmt = "prm_cot"
  special = automata.special_token_ids(tok)
  template = prm_prompt.build_template(tok, fmt, special, len(tok))
  prob_rows = [rm_ids.problem_ids(tok, p) for p in PROBLEMS]
  Q = max(map(len, prob_rows))
  problems = np.zeros((len(PROBLEMS), Q), np.int32)
  for i, r in enumerate(prob_rows):
    problems[i, :len(r)] = r
  resp_rows = [tok.encode(r) + [tok.eos_token_id] for r in RESPONSES]
  R = max(map(len, resp_rows)) + 2
  responses = np.full((len(resp_rows), R), 5, np.int32)
  for i, r in enumerate(resp_rows):
    responses[i, :len(r)] = r
  lengths = np.asarray([len(r) for r in resp_rows], np.int32)
  gate = automata.build_gate(tok.token_bytes_table(), automata.special_token_ids(tok))
  cut = jax.jit(automata.run_gate)(gate, responses, lengths).cut_N
  packed, n = jax.jit(prm_prompt.pack, static_argnums=(5,))(template, problems, np.asarray(list(map(len, prob_rows))),
                                                          responses, cut, G)
  packed, n = np.asarray(packed), np.asarray(n)
  with_special = sum(any(t in special for t in r[:int(c)]) for r, c in zip(resp_rows, cut))
  assert with_special >= 3, "no response carries a special token before its cut: the dropping is untested"
  for i, text in enumerate(RESPONSES):
    kept = rm_ids.visible_ids(resp_rows[i][:int(cut[i])], special)
    host = rm_ids.rm_prompt_ids(tok, fmt, PROBLEMS[i // G], kept)
    assert n[i] == len(host)
    assert packed[i, packed.shape[1] - n[i]:].tolist() == host
    assert (packed[i, :packed.shape[1] - n[i]] == 0).all()
    visible = tok.decode(resp_rows[i][:int(cut[i])], skip_special_tokens=True)
    assert visible == truncate_after_answer(tok.decode(resp_rows[i], skip_special_tokens=True)), text
    assert tok.decode(kept) == visible and not any(t in special for t in kept)


def test_count_non_canonical(tok):
  text = RESPONSES[0]
  per_char = [i for ch in text for i in tok.encode(ch)]
  assert rm_ids.count_non_canonical(tok, [tok.encode(text), per_char, per_char]) == 2


def test_pack_rejects_mismatched_groups(tok):
  template = prm_prompt.build_template(tok, "prm")
  with pytest.raises(ValueError, match="3 responses for 2 problems x group_size 2"):
    prm_prompt.pack(template, np.zeros((2, 3), np.int32), np.ones(2, np.int32), np.zeros((3, 4), np.int32),
                    np.ones(3, np.int32), 2)


# ------------------------------------------------------------------------------------- SFT rows (Qwen2.5 BPE)

SFT_PROBLEM = "Find x if 2x = 10."
SFT_SOLUTION = "Step 1: Divide both sides by 2.\n\nStep 2: So x = 5."
VERIFICATION = ("<think>\nBoth steps hold.\n</think>\n\n## Step 1: halve\nFine.\n**This step is correct.**\n\n"
                "## Step 2: read off x\nFine.\n**This step is correct.**\n\n"
                "**Verification: Is the answer correct (Yes/No)? Yes**")
TARGETS = {"orm": "Yes", "prm": aggregate.prm_target([True, True], True),
           "prm_cot": aggregate.prm_cot_target(VERIFICATION), "think_prm": aggregate.think_prm_target(VERIFICATION)}


@pytest.fixture(scope="module")
def qwen():
  from spark_jax.tokenizer_qwen import load_qwen2_tokenizer
  return load_qwen2_tokenizer()


def _sft_row(fmt: str) -> dict:
  return formats.sft_example(fmt, SFT_PROBLEM, SFT_SOLUTION, TARGETS[fmt], variant="v", problem_id="p",
                             solution_id="s")


def _tokenized(qwen, row: dict, where: str = "rows.jsonl:1") -> tuple[list[int], list[int]]:
  ids, mask = data_lib.tokenize_rows(iter([(where, row)]), qwen, max_length=4096).example(0)
  return ids.tolist(), mask.tolist()


@pytest.mark.parametrize("fmt", RM_FORMATS)
def test_sft_row_trains_on_the_piecewise_prompt_ids(qwen, fmt):
  row = _sft_row(fmt)
  ids, mask = _tokenized(qwen, row)
  prompt = rm_ids.rm_prompt_ids(qwen, fmt, SFT_PROBLEM, SFT_SOLUTION)
  # Today's whole-string rendering: its prompt part differs from the pieces, its reply part is the reference.
  whole_ids, whole_mask = qwen.render_chat_with_assistant_mask(row["messages"])
  whole_prompt = qwen.apply_chat_template(row["messages"][:1])
  assert whole_ids[:len(whole_prompt)] == whole_prompt and whole_prompt != prompt
  assert ids == prompt + whole_ids[len(whole_prompt):]
  assert mask == [0] * len(prompt) + whole_mask[len(whole_prompt):]
  assert qwen.decode([i for i, m in zip(ids, mask) if m]) == TARGETS[fmt] + "<|im_end|>"


def test_rows_without_rm_prompt_tokenize_their_whole_rendering(qwen):
  row = _sft_row("orm")
  whole_ids, whole_mask = qwen.render_chat_with_assistant_mask(row["messages"])
  no_field = {k: v for k, v in row.items() if k != "rm_prompt"}
  for plain in (no_field, dict(row, rm_prompt=None)):  # None: a parquet file that mixes both kinds of rows
    assert _tokenized(qwen, plain) == (whole_ids, whole_mask)


@pytest.mark.parametrize("edit, error", [
    (lambda r: r["rm_prompt"].update(problem="Find y if 2y = 10."),
     r"rows\.jsonl:7: messages\[0\]\['content'\] is not rm_prompt\(.*first differ at character 14"),
    (lambda r: r["rm_prompt"].pop("solution"), r"rows\.jsonl:7: 'rm_prompt' must be a dict of string"),
    (lambda r: r.update(format="orm"), r"rows\.jsonl:7: rm_prompt\.format 'prm' .* equal the row's 'format' 'orm'"),
    (lambda r: r["messages"].insert(0, {"role": "system", "content": "Be brief."}),
     r"rows\.jsonl:7: a row with 'rm_prompt' must have exactly a user then an assistant message"),
])
def test_sft_row_whose_fields_disagree_is_an_error(qwen, edit, error):
  row = _sft_row("prm")
  edit(row)
  with pytest.raises(ValueError, match=error):
    _tokenized(qwen, row, where="rows.jsonl:7")


def test_reply_after_prompt_ids_rejects_other_prompt_ids(qwen):
  row = _sft_row("prm")
  with pytest.raises(ValueError, match="prompt_ids do not decode to the chat-rendered prompt turns"):
    qwen.render_reply_after_prompt_ids(row["messages"], qwen.encode("Problem: something else"))


def test_host_prompts_for_a_prm_with_another_tokenizer(tok, qwen):
  """`reward.in_graph=False` is the path for a PRM with another tokenizer: it gets the response's text (cut
  after the last `</answer>`, special tokens dropped), decoded by the policy's tokenizer and tokenized alone by
  its own, as Stage II trained it. With one tokenizer it gets the sampled ids, exactly as the graph packs them."""
  from spark_jax.rl import programs
  from spark_jax.rl import step as rl_step
  assert tok.token_bytes_table() != qwen.token_bytes_table()  # really two vocabularies
  G = 2
  special = automata.special_token_ids(tok)
  ids = [tok.encode(r) for r in RESPONSES]
  texts = [tok.decode(r, skip_special_tokens=True) for r in ids]
  for gated in (False, True):
    settings = rl_step.RolloutSettings(group_size=G, max_response=64, stop_token_ids=(), prm_all_rows=not gated)
    ask, prompts = programs.host_prm_prompts(settings, texts, ids, PROBLEMS, qwen, tok.token_bytes_table(), special,
                                             policy_tokenizer=tok)
    assert ask == ([i for i, t in enumerate(texts) if format_ok(t)] if gated else list(range(len(RESPONSES))))
    assert 0 < len(ask)
    for i, prompt in zip(ask, prompts):
      visible = truncate_after_answer(texts[i])
      assert qwen.decode(prompt) == qwen.apply_chat_template(
          [{"role": "user", "content": rm_prompt("prm_cot", PROBLEMS[i // G], visible)}], tokenize=False)
      assert prompt == rm_ids.rm_prompt_ids(qwen, "prm_cot", PROBLEMS[i // G], visible)
  settings = rl_step.RolloutSettings(group_size=G, max_response=64, stop_token_ids=(), prm_all_rows=True)
  ask, prompts = programs.host_prm_prompts(settings, texts, ids, PROBLEMS, tok, tok.token_bytes_table(), special)
  for i, prompt in zip(ask, prompts):
    kept = rm_ids.visible_ids(ids[i][:programs._cut(ids[i], tok.token_bytes_table(), special)], special)
    assert prompt == rm_ids.rm_prompt_ids(tok, "prm_cot", PROBLEMS[i // G], kept)
