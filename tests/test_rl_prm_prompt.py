"""The reward-model prompt built from ids: host and graph give the same ids, and they decode to the prompt text."""

import jax
import numpy as np
import pytest

from spark_jax.rl import automata
from spark_jax.rl import prm_prompt
from spark_jax.rl.rewards import truncate_after_answer
from spark_jax.text.rm import rm_prompt
from spark_jax.tokenizer import Tokenizer

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
    ids = prm_prompt.rm_prompt_ids(tok, fmt, problem, solution)
    text = tok.apply_chat_template([{"role": "user", "content": rm_prompt(fmt, problem, solution)}], tokenize=False)
    assert tok.decode(ids) == text
    assert prm_prompt.rm_prompt_ids(tok, fmt, problem, tok.encode(solution)) == ids  # ids in = text in


def test_graph_packing_equals_host_ids(tok):
  G = 2
  fmt = "prm_cot"
  template = prm_prompt.build_template(tok, fmt)
  prob_rows = [prm_prompt.problem_ids(tok, p) for p in PROBLEMS]
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
  for i, text in enumerate(RESPONSES):
    host = prm_prompt.rm_prompt_ids(tok, fmt, PROBLEMS[i // G], resp_rows[i][:int(cut[i])])
    assert n[i] == len(host)
    assert packed[i, packed.shape[1] - n[i]:].tolist() == host
    assert (packed[i, :packed.shape[1] - n[i]] == 0).all()
    visible = tok.decode(resp_rows[i][:int(cut[i])], skip_special_tokens=True)
    assert visible == truncate_after_answer(tok.decode(resp_rows[i], skip_special_tokens=True)), text


def test_count_non_canonical(tok):
  text = RESPONSES[0]
  per_char = [i for ch in text for i in tok.encode(ch)]
  assert prm_prompt.count_non_canonical(tok, [tok.encode(text), per_char, per_char]) == 2


def test_pack_rejects_mismatched_groups(tok):
  template = prm_prompt.build_template(tok, "prm")
  with pytest.raises(ValueError, match="3 responses for 2 problems x group_size 2"):
    prm_prompt.pack(template, np.zeros((2, 3), np.int32), np.ones(2, np.int32), np.zeros((3, 4), np.int32),
                    np.ones(3, np.int32), 2)
