"""Stage III: GRPO with a generative PRM as the reward, inside the jitted step (docs/method.md, Stage III).

Pure pieces: rewards (host reference rules), automata (the same rules on token ids, in the graph), advantages,
loss, prm_prompt (the PRM prompt built from ids). The step and the loop build on them.
"""
