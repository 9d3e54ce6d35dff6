"""The `inspect_model` job: load a model, print a logit summary of a prompt and a short greedy continuation."""

from __future__ import annotations

from spark_jax.io import write_summary


def run_inspect_model(config) -> dict:
  """Loads a model and prints a logit summary of the prompt and a short greedy continuation."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from spark_jax import models, sampling, sharding
  from spark_jax.models.load import load_model
  from spark_jax.tokenizer import Tokenizer

  mesh = sharding.make_mesh(config.mesh.to_dict())
  with sharding.use_mesh(mesh):
    cfg, params, ckpt_dir = load_model(config.model.name, init=config.model.init, dtype=config.model.dtype,
                                       mesh=mesh, seed=config.seed,
                                       scan_layers=bool(config.model.get("scan_layers", True)))
  tokenizer = Tokenizer.from_pretrained(ckpt_dir) if ckpt_dir else None
  if tokenizer is not None:
    messages = [{"role": "user", "content": config.prompt}]
    ids = tokenizer.apply_chat_template(messages) if config.chat else tokenizer.encode(config.prompt)
  else:
    ids = [int(t) % cfg.vocab_size for t in config.prompt.encode()]
  logits = np.asarray(jax.jit(models.forward, static_argnums=0)(cfg, params, jnp.asarray([ids])))[0]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -float(np.mean(np.take_along_axis(np.asarray(logp[:-1]), np.asarray(ids[1:])[:, None], -1)))
  top = np.argsort(-logits[-1])[:5]
  fmt = (lambda t: repr(tokenizer.decode([int(t)]))) if tokenizer else str
  print(f"model: {config.model.name} ({cfg.family}, {cfg.num_params / 1e6:.1f}M params, {cfg.dtype}) "
        f"on mesh {dict(mesh.shape)}")
  print(f"prompt tokens: {len(ids)}   prompt perplexity: {np.exp(nll):.3f}")
  print("next-token top-5: " + ", ".join(f"{fmt(t)} {float(jax.nn.softmax(logits[-1])[t]):.3f}" for t in top))
  stop = tokenizer.end_of_turn_ids if tokenizer else ()
  out = sampling.generate(cfg, params, [ids], max_new_tokens=config.max_new_tokens, stop_token_ids=stop,
                          mesh=mesh)[0][0]
  text = tokenizer.decode(out.tokens, skip_special_tokens=True) if tokenizer else str(out.tokens)
  print(f"greedy continuation ({len(out.tokens)} tokens, {out.finish_reason}):\n{text}")
  summary = {"model": config.model.name, "prompt_tokens": len(ids), "prompt_perplexity": float(np.exp(nll)),
             "continuation": text, "finish_reason": out.finish_reason}
  write_summary(config.workdir, summary)
  return summary
