"""The `processbench` job: run a model over ProcessBench and write the F1 table.

Modes:
  prm     a generative reward model trained by spark_jax (formats prm, prm_cot, think_prm): the PRM prompt
          over the steps rendered as `Step k: ...` (D8), built as ids by `text.rm_ids.rm_prompt_ids` (the
          construction of the SFT rows and the RL reward), greedy, parsed with the format's own parser; the
          prediction is the first step judged incorrect (or -1).
  critic  any instruct model with ProcessBench's own protocol (indexed paragraphs, the earliest-error index
          or -1 in the last \\boxed{}), optionally k samples with majority voting.

Predictions are written in resumable shards; the job ends with scores.json, table.md and summary.json.
"""

from __future__ import annotations

import collections
import os

from spark_jax import io
from spark_jax.evals import processbench as pb
from spark_jax.text.rm_ids import rm_prompt_ids
from spark_jax.text import verdicts as parsing

PRM_FORMATS = ("prm", "prm_cot", "think_prm")


def _prm_verdicts(fmt: str, text: str) -> list[bool]:
  parsed = parsing.parse_prm_output(text) if fmt == "prm" else parsing.parse_verification(text)
  return parsed["steps"]


def _prm_prompts(tokenizer, fmt: str, cases: list[dict]) -> list[list[int]]:
  """Each case's reward-model prompt as the ids the PRM was trained on and is queried with at RL time.

  The chat template renders it with its default thinking setting, as for the SFT rows and the RL reward. The
  explicit enable_thinking=True think_prm used to pass renders the same for ChatML templates, which ignore it,
  and for Qwen3's released templates, which change the generation prompt only for enable_thinking=False.
  """
  return [rm_prompt_ids(tokenizer, fmt, c["problem"], pb.render_steps(c["steps"])) for c in cases]


def _limited(cases: list[dict], limit: int) -> list[dict]:
  """`limit` cases per split, half all-correct (label -1) and half erroneous, each in file order.

  The files are not shuffled (a split's first rows can all be erroneous), and an F1 needs both kinds.
  """
  if not limit:
    return cases
  out = []
  for split in dict.fromkeys(c["split"] for c in cases):
    rows = [c for c in cases if c["split"] == split]
    correct = [c for c in rows if c["label"] == -1][:(limit + 1) // 2]
    erroneous = [c for c in rows if c["label"] != -1][:limit - len(correct)]
    keep = {id(c) for c in correct + erroneous}
    out.extend(c for c in rows if id(c) in keep)
  return out


def run_processbench(config) -> dict:
  from spark_jax.sampling.chat import ChatModel

  if config.mode not in ("prm", "critic"):
    raise ValueError(f"config.mode={config.mode!r}; use 'prm' (our trained reward models) or 'critic'.")
  if config.mode == "prm" and config.format not in PRM_FORMATS:
    raise ValueError(f"config.format={config.format!r}: ProcessBench needs step verdicts, so use one of "
                     f"{PRM_FORMATS} (an ORM cannot locate the first error).")
  cases = _limited(pb.load_processbench(config.data, splits=tuple(config.splits) or None), config.limit)
  for i, case in enumerate(cases):
    case["_index"] = i
  out_dir = config.workdir
  shards = io.ShardedOutput(out_dir, "predictions", cases, config.shard_size)
  model = ChatModel.load(config.model, config.mesh, seed=config.seed,
                         max_batch_rows=config.max_batch_rows, batching=config.batching) if shards.pending() else None

  def work(items):
    if config.mode == "prm":
      outs = model.sample_ids(_prm_prompts(model.tokenizer, config.format, items), num_samples=1, temperature=0.0,
                              max_new_tokens=config.max_new_tokens)
      preds = [[pb.prediction_from_verdicts(_prm_verdicts(config.format, o[0].text), len(c["steps"]))]
               for c, o in zip(items, outs)]
    else:
      messages = [pb.critic_prompt(c["problem"], c["steps"]) for c in items]
      outs = model.sample(messages, num_samples=config.num_votes,
                          temperature=config.temperature if config.num_votes > 1 else 0.0,
                          top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                          seed=config.seed, prompt_indices=[c["_index"] for c in items])
      preds = [[pb.parse_critic_output(s.text, len(c["steps"])) for s in o] for c, o in zip(items, outs)]
    return [{"id": c["id"], "split": c["split"], "label": c["label"],
             "prediction": p[0] if len(p) == 1 else pb.vote(p), "samples": p,
             "outputs": [s.text for s in o], "num_tokens": sum(s.num_tokens for s in o)}
            for c, p, o in zip(items, preds, outs)]

  timing = shards.run(work, unit_counter=lambda rs: sum(r["num_tokens"] for r in rs))
  records = shards.read_all()
  scores = pb.f1_scores(records, [r["prediction"] for r in records])
  table = pb.markdown_table(scores)
  io.write_json_atomic(os.path.join(out_dir, "scores.json"), scores)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  summary = {"job": "processbench", "model": config.model.name, "mode": config.mode,
             "format": config.format if config.mode == "prm" else None, "cases": len(records),
             "per_split": dict(collections.Counter(r["split"] for r in records)),
             "average_f1": scores["average"]["f1"], "scores": scores, **timing}
  io.write_summary(out_dir, summary)
  return summary
