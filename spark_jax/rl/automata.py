"""Token-level automata: the format gate, the policy's step tags and the PRM's verdict markers on token ids.

The rules are about the text the tokens spell, never about particular ids, so no other tokenisation of the
same text can slip through. Each rule is a byte machine compiled on the host into a token table and run in
the graph as a `lax.scan` of table lookups (rl/token_dfa.py): linear in tokens, exact under any split of the
text into tokens. Special tokens spell nothing, as in a decode that skips them; padding is masked by length.
Build the tables once per run (`build_*`, seconds to a minute for a 152k vocabulary) and pass them to the
jitted program as arguments (they are pytrees).

Rules (host references in rl/rewards.py; both sides are tested to agree on random texts and random splits):

  gate      rl/rewards.format_ok: exactly one `\\boxed{` opener with a `}` later on its line (an opener
            preceded by a backslash, `\\\\boxed{`, counts twice, as in the released code), exactly one
            `<answer>` and one `</answer>`, in that order, and nothing but ASCII whitespace after `</answer>`.
            Also returns the cut: the number of tokens up to the one in which the last `</answer>` ends (the
            whole response when there is none).
  steps     rl/rewards.policy_step_spans: a step opens at a `<step...>` tag and ends before the next tag,
            `</think>`, `</answer>` or the end (before a final newline); the output is, per step, the index of
            the token holding its last byte.
  verdicts  the final Yes/No of text/verdicts.parse_final_verdict (four tiers, first tier with a match, first
            match in it), plus the per-step verdicts in order: `**This step is correct.**` /
            `**This step is incorrect.**` markers (prm_cot) or `Step k: Correct|Incorrect` lines (prm), both
            after the `<think>` trace as text/verdicts strips it; orm: the whole output is Yes or No.

Narrowings against the host rules (documented in docs/method.md; they only touch texts no trained PRM or
policy writes): case folding, `\\s`, `\\d`, whitespace and word characters are ASCII (a byte >= 0x80 counts as
a word character and as non-whitespace); a PRM output with a second `</think>`, or a `<think>` that never
closes, is flagged `unsupported` and gets no verdict (the host reads the text after the first `</think>`
verbatim, or resumes an unclosed trace at `## Step 1:`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from spark_jax.rl.token_dfa import (ASCII_WS, DIGITS, EOT, REGEX_WS, WORD_END, WORD_START, ByteMachine, Searcher,
                                    TokenAutomaton, alt, cls, compile_machine, lit, mark, opt, plus, scan, seq,
                                    special_token_ids, star)
from spark_jax.rl.token_dfa import outputs as _outputs
from spark_jax.rl.token_dfa import append as _append
from spark_jax.text import rm as rm_text
from spark_jax.text import verdicts as verdicts_text

__all__ = ["build_gate", "run_gate", "build_step_ends", "run_step_ends", "build_verdicts", "run_verdicts",
           "special_token_ids", "GateResult", "StepResult", "VerdictResult", "VerdictTables", "TokenAutomaton"]


# ------------------------------------------------------------------------------------------------- the gate


_BOX, _BOX2, _ANS_OPEN, _ANS_CLOSE = 1, 2, 3, 4
_GATE_SEARCH = Searcher(seq(lit("\\boxed{"), mark(_BOX)), seq(lit("\\\\boxed{"), mark(_BOX2)),
                        seq(lit("<answer>"), mark(_ANS_OPEN)), seq(lit("</answer>"), mark(_ANS_CLOSE)))
OP_BOX, OP_RBRACE, OP_NEWLINE, OP_OPEN, OP_CLOSE = 1, 2, 3, 4, 5


def _gate_step(state, byte):
  """State: (literal search, clean = only whitespace since the last `</answer>`); the counting is in ops."""
  live, clean = state
  if byte == EOT:
    return state, ()
  live, _, events = _GATE_SEARCH.step(live, byte)
  ops = [OP_RBRACE] if byte == ord("}") else [OP_NEWLINE] if byte == ord("\n") else []
  clean = clean and byte in ASCII_WS
  for e in events:
    if e in (_BOX, _BOX2):  # `\\boxed{` fires both: it counts twice
      ops.append(OP_BOX)
    elif e == _ANS_OPEN:
      ops.append(OP_OPEN)
    elif e == _ANS_CLOSE:
      ops.append(OP_CLOSE)
      clean = True
  return (live, clean), tuple(ops)


GATE_MACHINE = ByteMachine("gate", (_GATE_SEARCH.start, True), _gate_step, lambda s: (int(s[1]),), ("clean",),
                           ("box", "rbrace", "newline", "open", "close"), collapse=(OP_RBRACE, OP_NEWLINE))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GateResult:
  """ok_N: bool, the format gate. text_after_answer_N: bool, non-whitespace after the last `</answer>`.
  cut_N: int32, tokens up to and including the one where the last `</answer>` ends (lengths_N when none).
  cut_inside_token_N: bool, that `</answer>` ends before the last byte of its token (the cut keeps the
  token's remaining bytes, which for a row passing the gate are whitespace)."""

  ok_N: jax.Array
  text_after_answer_N: jax.Array
  cut_N: jax.Array
  cut_inside_token_N: jax.Array


def build_gate(token_bytes: Sequence[bytes], special_ids: Sequence[int]) -> TokenAutomaton:
  """The format gate's token table for a tokenizer (host, once per run)."""
  return compile_machine(GATE_MACHINE, token_bytes, special_ids)


def run_gate(automaton: TokenAutomaton, tokens_NxT: jax.Array, lengths_N: jax.Array) -> GateResult:
  """The format gate on right-padded responses (tokens past lengths_N are ignored). Traceable."""
  N = tokens_NxT.shape[0]
  zeros = jnp.zeros((N,), jnp.int32)

  def apply(c, op, t, first, last, last_nonempty, present):
    pending, boxes, opens, closes, ordered, cut, inside = c
    on = lambda k: present & (op == k)  # noqa: E731
    boxes = jnp.where(on(OP_RBRACE), boxes + pending, boxes)  # a `}` closes every pending opener on its line
    pending = jnp.where(on(OP_RBRACE) | on(OP_NEWLINE), 0, pending + on(OP_BOX))
    opens = opens + on(OP_OPEN)
    close = on(OP_CLOSE)
    ordered = jnp.where(close & (closes == 0), opens == 1, ordered)
    return (pending, boxes, opens, closes + close, ordered, jnp.where(close, t + 1, cut),
            jnp.where(close, ~last, inside))

  init = (zeros, zeros, zeros, zeros, jnp.zeros((N,), bool), zeros - 1, jnp.zeros((N,), bool))
  (_, boxes, opens, closes, ordered, cut, inside), state, _, _ = scan(automaton, tokens_NxT, lengths_N, init, apply)
  clean = _outputs(automaton, state, "clean") == 1
  return GateResult(ok_N=(boxes == 1) & (opens == 1) & (closes == 1) & ordered & clean,
                    text_after_answer_N=(closes > 0) & ~clean,
                    cut_N=jnp.where(cut < 0, lengths_N, cut).astype(jnp.int32), cut_inside_token_N=inside)


# ------------------------------------------------------------------------------------------ policy step tags


_LT, _STEP_TAG, _STEP_DELIM = 1, 2, 3
_STEP_SEARCH = Searcher(seq(lit("<step", icase=True), mark(_STEP_TAG)),
                        seq(alt(lit("</think>", icase=True), lit("</answer>", icase=True)), mark(_STEP_DELIM)))
OP_SAVE, OP_COPY, OP_EMIT_SAVED, OP_EMIT_TENTATIVE, OP_START, OP_EMIT_END = 1, 2, 3, 4, 5, 6
_OUT, _TAG, _BODY, _PENDING = 0, 1, 2, 3


def _steps_step(state, byte):
  live, mode = state
  if byte == EOT:
    return (live, _OUT), ((OP_EMIT_END,) if mode in (_BODY, _PENDING) else ())
  live, _, events = _STEP_SEARCH.step(live, byte)
  ops = [OP_SAVE] if byte == ord("<") else []
  if mode == _OUT and _STEP_TAG in events:
    mode = _TAG
  elif mode == _TAG and byte == ord(">"):
    mode = _BODY
    ops.append(OP_START)
  elif mode == _BODY and _STEP_TAG in events:
    mode = _PENDING
    ops.append(OP_COPY)
  elif mode == _BODY and _STEP_DELIM in events:
    mode = _OUT
    ops.append(OP_EMIT_SAVED)
  elif mode == _PENDING and byte == ord(">"):
    mode = _BODY
    ops += [OP_EMIT_TENTATIVE, OP_START]
  return (live, mode), tuple(ops)


STEP_MACHINE = ByteMachine("steps", (_STEP_SEARCH.start, _OUT), _steps_step, lambda s: (), (),
                           ("save", "copy", "emit_saved", "emit_tentative", "start", "emit_end"), collapse=(OP_SAVE,))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepResult:
  """ends_NxY: int32, token index holding the last byte of policy step j (j < min(count_N, K)), -1 after.
  count_N: int32, number of steps (not capped at K)."""

  ends_NxY: jax.Array
  count_N: jax.Array


def build_step_ends(token_bytes: Sequence[bytes], special_ids: Sequence[int]) -> TokenAutomaton:
  """The `<step>` tag automaton's token table (host)."""
  return compile_machine(STEP_MACHINE, token_bytes, special_ids)


def run_step_ends(automaton: TokenAutomaton, tokens_NxT: jax.Array, lengths_N: jax.Array, max_steps: int = 32
                  ) -> StepResult:
  """Policy step ends on right-padded responses; the first `max_steps` ends are kept. Traceable."""
  N = tokens_NxT.shape[0]
  ends0 = jnp.full((N, max_steps), -1, jnp.int32)
  zeros = jnp.zeros((N,), jnp.int32)

  def apply(c, op, t, first, last, last_nonempty, present):
    saved, tentative, ends, n_ends, n_steps, end_pos = c
    # The byte before this `<` is in the previous non-empty token when the `<` is the token's first byte.
    saved = jnp.where(present & (op == OP_SAVE), jnp.where(first, last_nonempty, t), saved)
    tentative = jnp.where(present & (op == OP_COPY), saved, tentative)
    emit = present & ((op == OP_EMIT_SAVED) | (op == OP_EMIT_TENTATIVE) | (op == OP_EMIT_END))
    value = jnp.where(op == OP_EMIT_SAVED, saved, jnp.where(op == OP_EMIT_TENTATIVE, tentative, end_pos))
    ends, n_ends = _append(ends, n_ends, value, emit)
    n_steps = n_steps + (present & (op == OP_START)).astype(jnp.int32)
    return saved, tentative, ends, n_ends, n_steps, end_pos

  # EMIT_END (a step still open at the end) closes on the text's last token, known before the scan.
  end_pos = _last_text_token(automaton, tokens_NxT, lengths_N)
  (_, _, ends, _, n_steps, _), _, _, _ = scan(automaton, tokens_NxT, lengths_N,
                                              (zeros - 1, zeros - 1, ends0, zeros, zeros, end_pos), apply)
  return StepResult(ends_NxY=ends, count_N=n_steps)


def _last_text_token(automaton: TokenAutomaton, tokens_NxT, lengths_N):
  """Token holding the text's last byte, or its last byte before a final newline (a regex `$`). -1 if empty."""
  T = tokens_NxT.shape[1]
  valid_NxT = jnp.arange(T)[None, :] < lengths_N[:, None]
  nonempty_NxT = valid_NxT & automaton.nonempty_V[tokens_NxT]
  idx_NxT = jnp.where(nonempty_NxT, jnp.arange(T)[None, :], -1)
  last_N = jnp.max(idx_NxT, axis=1)
  prev_N = jnp.max(jnp.where(idx_NxT < last_N[:, None], idx_NxT, -1), axis=1)
  last_is_newline_N = automaton.newline_V[jnp.take_along_axis(tokens_NxT, jnp.maximum(last_N, 0)[:, None], 1)[:, 0]]
  return jnp.where((last_N >= 0) & last_is_newline_N, prev_N, last_N).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ verdicts

# Two automata read a reward model's output: `final` (the Yes/No verdict, four tiers) and `marks` (the step
# verdicts in order). Both see the `<think>` tags; the tier bookkeeping lives in the scan's carry (ops), so the
# tables stay small (a 152k vocabulary x ~100 states).

_E_P1, _E_P2, _E_P3, _E_YES, _E_NO, _E_T4YES, _E_T4NO, _E_OPEN, _E_CLOSE, _E_CORRECT, _E_INCORRECT = range(1, 12)
# ops of the `final` automaton
(OP_P1, OP_P2, OP_P3, OP_BREAK, OP_QMARK, OP_YES, OP_NO, OP_T4YES, OP_T4NO, OP_THINK_OPEN,
 OP_THINK_CLOSE, OP_QMARK_AGAIN) = range(1, 13)
# ops of the `marks` automaton (think ops share the ids above)
OP_MARK_CORRECT, OP_MARK_INCORRECT = 1, 2
_T4_TAIL = frozenset(b" \t*.!}")


def _think_patterns():
  return (seq(lit(verdicts_text.THINK_OPEN), mark(_E_OPEN)), seq(lit(verdicts_text.THINK_CLOSE), mark(_E_CLOSE)))


def _final_patterns():
  """text/verdicts' final-verdict tiers, split into what ends at "correct" (the tier of the phrase, events
  P1..P3) and the answer after a `?` (YES/NO with a word boundary for tiers 1-3, T4YES/T4NO without one for
  tier 4, which must then reach the end of the text)."""
  tail = seq(lit("?"), star(cls(" \t*")), opt(lit("\\boxed{")), star(cls(" \t*")))
  return (
      seq(lit("verification", icase=True), opt(lit(":")), star(cls(REGEX_WS | {ord("*")})),
          lit("is the answer correct", icase=True), mark(_E_P1)),
      seq(lit("is the answer correct", icase=True), mark(_E_P2)),
      seq(lit("answer correct", icase=True), mark(_E_P3)),
      seq(tail, alt(seq(lit("yes", icase=True), mark(_E_T4YES), WORD_END, mark(_E_YES)),
                    seq(lit("no", icase=True), mark(_E_T4NO), WORD_END, mark(_E_NO)))),
  ) + _think_patterns()


def _mark_patterns(fmt: str):
  if fmt == "prm_cot":
    return (seq(lit(rm_text.STEP_CORRECT_MARKER, icase=True), mark(_E_CORRECT)),
            seq(lit(rm_text.STEP_INCORRECT_MARKER, icase=True), mark(_E_INCORRECT))) + _think_patterns()
  # prm: text/verdicts' `Step k: Correct|Incorrect` line.
  ws = star(cls(REGEX_WS))
  head = seq(WORD_START, lit("step", icase=True), plus(cls(REGEX_WS)), plus(cls(DIGITS)), ws, lit(":"), ws,
             opt(lit("**")), ws)
  return (seq(head, lit("correct", icase=True), WORD_END, mark(_E_CORRECT)),
          seq(head, lit("incorrect", icase=True), WORD_END, mark(_E_INCORRECT))) + _think_patterns()


class _FinalRule:
  """State: (search, tier-4 tail phase: 0 none, 1 in [ \\t*.!}]*, 2 in trailing whitespace, 3 dead,
  a phrase ended since the last `?` or newline). A `?` with no phrase before it on its segment emits
  QMARK_AGAIN (only tier 4 can answer it), which unlike QMARK is idempotent, so tokens such as `????` or
  `?,?,?,?,` emit one op; a newline emits BREAK only when it ends a segment holding a phrase."""

  def __init__(self):
    self.search = Searcher(*_final_patterns())
    self.start = (self.search.start, 0, False)

  def step(self, state, byte):
    live, phase, phrase = state
    if byte == EOT:
      live, early, _ = self.search.step(live, byte)
      return (live, phase, False), tuple(OP_YES if e == _E_YES else OP_NO for e in early)
    if phase in (1, 2):
      phase = 1 if phase == 1 and byte in _T4_TAIL else 2 if byte in ASCII_WS else 3
    live, early, events = self.search.step(live, byte)
    ops = [OP_YES if e == _E_YES else OP_NO for e in early]  # answers that ended before this byte
    if byte == ord("?"):
      ops.append(OP_QMARK if phrase else OP_QMARK_AGAIN)
    elif byte == ord("\n") and phrase:
      ops.append(OP_BREAK)
    if byte in (ord("?"), ord("\n")):
      phrase = False
    levels = [e for e in events if e in (_E_P1, _E_P2, _E_P3)]
    if levels:
      ops.append(OP_P1 + min(levels) - _E_P1)  # nested phrases end together: the best tier is enough
      phrase = True
    for e in events:
      if e in (_E_T4YES, _E_T4NO):
        ops.append(OP_T4YES if e == _E_T4YES else OP_T4NO)
        phase = 1
      elif e == _E_OPEN:
        ops.append(OP_THINK_OPEN)
      elif e == _E_CLOSE:  # text before `</think>` is dropped: start over
        return self.start, tuple(ops) + (OP_THINK_CLOSE,)
    return (live, phase, phrase), tuple(ops)


class _MarkRule:
  def __init__(self, fmt: str):
    self.search = Searcher(*_mark_patterns(fmt))
    self.start = self.search.start

  def step(self, live, byte):
    live, early, events = self.search.step(live, byte)
    ops = []
    for e in early + events:
      if e in (_E_CORRECT, _E_INCORRECT):
        ops.append(OP_MARK_CORRECT if e == _E_CORRECT else OP_MARK_INCORRECT)
      elif e == _E_OPEN:
        ops.append(OP_THINK_OPEN)
      elif e == _E_CLOSE:
        return self.search.start, tuple(ops) + (OP_THINK_CLOSE,)
    return live, tuple(ops)


def _orm_step(state, byte):
  phase, word = state  # phase 0: leading ws, 1: in the word, 2: trailing ws, 3: dead
  if byte == EOT or phase == 3:
    return state, ()
  lower = chr(byte).lower() if byte < 128 else ""
  if phase == 0 and byte in ASCII_WS:
    return state, ()
  if phase in (0, 1) and lower and any(w.startswith(word + lower) for w in ("yes", "no")):
    return (1, word + lower), ()
  if phase in (1, 2) and byte in ASCII_WS and word in ("yes", "no"):
    return (2, word), ()
  return (3, ""), ()


def _orm_outputs(state):
  phase, word = state
  return (1 if phase in (1, 2) and word == "yes" else 0 if phase in (1, 2) and word == "no" else -1,)


_OP_NAMES_FINAL = ("p1", "p2", "p3", "break", "qmark", "yes", "no", "t4yes", "t4no", "think_open", "think_close",
                   "qmark_again")


@functools.lru_cache(maxsize=None)
def verdict_machines(fmt: str) -> tuple[ByteMachine, ByteMachine | None]:
  """(final-verdict machine, step-verdict machine or None) for reward-model format `fmt`."""
  if fmt == "orm":
    return ByteMachine("verdicts:orm", (0, ""), _orm_step, _orm_outputs, ("orm",), ()), None
  if fmt not in ("prm", "prm_cot", "think_prm"):
    raise ValueError(f"unknown reward-model format {fmt!r}; use one of {rm_text.RM_FORMATS}.")
  final = _FinalRule()
  marks = _MarkRule("prm" if fmt == "prm" else "prm_cot")
  names = (None,) * (OP_THINK_OPEN - 1)
  return (ByteMachine(f"verdicts:{fmt}:final", final.start, final.step, lambda s: (int(s[1] in (1, 2)),),
                      ("t4_alive",), _OP_NAMES_FINAL, collapse=(OP_BREAK, OP_QMARK_AGAIN)),
          ByteMachine(f"verdicts:{fmt}:marks", marks.start, marks.step, lambda s: (), (),
                      ("correct", "incorrect") + names[2:] + ("think_open", "think_close")))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VerdictTables:
  """The token automata of one reward-model format (`build_verdicts`); `marks` is None for orm."""

  final: TokenAutomaton
  marks: TokenAutomaton | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VerdictResult:
  """final_N: int32, 1 Yes / 0 No / -1 none (also for unsupported rows). steps_NxY: int32 step verdicts in
  order, +1 correct / -1 incorrect, 0 past num_steps_N (or K). num_steps_N / correct_N / incorrect_N:
  int32 counts (not capped at K). unsupported_N: bool: a second `</think>`, or a `<think>` that never
  closes (module docstring); such rows get no verdicts."""

  final_N: jax.Array
  steps_NxY: jax.Array
  num_steps_N: jax.Array
  correct_N: jax.Array
  incorrect_N: jax.Array
  unsupported_N: jax.Array


def build_verdicts(fmt: str, token_bytes: Sequence[bytes], special_ids: Sequence[int]) -> VerdictTables:
  """The verdict automata's token tables for reward-model format `fmt` (host, once per run)."""
  final, marks = verdict_machines(fmt)
  return VerdictTables(compile_machine(final, token_bytes, special_ids),
                       None if marks is None else compile_machine(marks, token_bytes, special_ids))


_NONE_TIER = 9


def run_verdicts(tables: VerdictTables, tokens_NxT: jax.Array, lengths_N: jax.Array, max_steps: int = 32
                 ) -> VerdictResult:
  """Verdicts of right-padded reward-model outputs (tokens past lengths_N are ignored). Traceable."""
  N = tokens_NxT.shape[0]
  zeros = jnp.zeros((N,), jnp.int32)
  false = jnp.zeros((N,), bool)
  steps0 = (jnp.zeros((N, max_steps), jnp.int32), zeros, zeros)
  if tables.marks is None:  # orm: the whole output is the verdict
    _, state, _, _ = scan(tables.final, tokens_NxT, lengths_N, (), lambda c, *a: c)
    return VerdictResult(_outputs(tables.final, state, "orm"), *steps0, zeros, false)

  def think(c, op, present):
    opened, closes, unsupported = c
    is_open, is_close = present & (op == OP_THINK_OPEN), present & (op == OP_THINK_CLOSE)
    unsupported = unsupported | (is_close & (closes > 0))  # a second `</think>`: see VerdictResult
    return (opened | is_open, closes + is_close, unsupported), is_close & (closes == 0)

  def apply_final(c, op, t, first, last, last_nonempty, present):
    th, seg, tail, best, verdict, t4 = c
    th, reset = think(th, op, present)
    on = lambda k: present & (op == k)  # noqa: E731
    level = jnp.where(on(OP_P1), 0, jnp.where(on(OP_P2), 1, jnp.where(on(OP_P3), 2, _NONE_TIER)))
    seg = jnp.minimum(seg, level)
    tail = jnp.where(on(OP_QMARK), seg, jnp.where(on(OP_QMARK_AGAIN), _NONE_TIER, tail))
    seg = jnp.where(on(OP_QMARK) | on(OP_QMARK_AGAIN) | on(OP_BREAK), _NONE_TIER, seg)
    answer = on(OP_YES) | on(OP_NO)
    take = answer & (tail < _NONE_TIER) & (tail < best)  # the first match of the best tier sticks
    best, verdict = jnp.where(take, tail, best), jnp.where(take, on(OP_YES).astype(jnp.int32), verdict)
    t4 = jnp.where(on(OP_T4YES), 1, jnp.where(on(OP_T4NO), 0, t4))
    if_reset = lambda x, v: jnp.where(reset, v, x)  # noqa: E731
    return (th, if_reset(seg, _NONE_TIER), if_reset(tail, _NONE_TIER), if_reset(best, _NONE_TIER),
            if_reset(verdict, 0), if_reset(t4, -1))

  none = zeros + _NONE_TIER
  (th, _, _, best, verdict, t4), state, _, _ = scan(
      tables.final, tokens_NxT, lengths_N, ((false, zeros, false), none, none, none, zeros, zeros - 1), apply_final)
  opened, closes, unsupported = th
  unsupported = unsupported | (opened & (closes == 0))
  t4_alive = _outputs(tables.final, state, "t4_alive") == 1
  final = jnp.where(best < _NONE_TIER, verdict, jnp.where(t4_alive, t4, -1))
  final = jnp.where(unsupported, -1, final)

  def apply_marks(c, op, t, first, last, last_nonempty, present):
    th, buf, n, n_correct = c
    th, reset = think(th, op, present)
    buf = jnp.where(reset[:, None], 0, buf)
    n, n_correct = jnp.where(reset, 0, n), jnp.where(reset, 0, n_correct)
    hit = present & ((op == OP_MARK_CORRECT) | (op == OP_MARK_INCORRECT))
    buf, n = _append(buf, n, jnp.where(op == OP_MARK_CORRECT, 1, -1), hit)
    return th, buf, n, n_correct + (hit & (op == OP_MARK_CORRECT)).astype(jnp.int32)

  (_, buf, n, n_correct), _, _, _ = scan(tables.marks, tokens_NxT, lengths_N, ((false, zeros, false),) + steps0,
                                         apply_marks)
  keep = ~unsupported
  n, n_correct = jnp.where(keep, n, 0), jnp.where(keep, n_correct, 0)
  return VerdictResult(final_N=final.astype(jnp.int32), steps_NxY=jnp.where(keep[:, None], buf, 0),
                       num_steps_N=n, correct_N=n_correct, incorrect_N=n - n_correct, unsupported_N=unsupported)
