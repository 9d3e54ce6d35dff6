"""Training, shared by Stage II (SFT) and Stage III (RL).

  step        the pure jitted optimizer step (accumulation, AdamW, schedule), `token_logprobs`, the SFT loss
  checkpoint  orbax save/restore of any state pytree + data-iterator state, guarded by a settings fingerprint
  metrics     console bar, TensorBoard, metrics.jsonl, the NaN/Inf stop, library logs to the workdir
  loop        the generic loop (step t dispatched before step t-1's metrics are fetched)
  data        the SFT input pipeline (tokenize, length-bucketed batch plan, grain loader)
  perf        peak FLOP/s and MFU
  sft         the SFT job shell (`run_sft`, registered as "sft" in spark_jax.jobs)
"""
