"""A small engine for token-level automata: byte rules compiled to V x S token tables, run by `lax.scan`.

A rule is a `ByteMachine`: a deterministic machine over UTF-8 bytes written in Python (literal and
character-class patterns come from the tiny regex-to-NFA builder here, `Searcher`). `enumerate_machine`
enumerates its reachable states and minimises them; `compile_tokens` runs every token's bytes from every
state, giving

    next_VxZ[token, state] -> state        code_VxZ[token, state] -> the ops the token's bytes emit, in order

and `scan` runs that table over right-padded token rows: linear in tokens and exact under any split of the
text into tokens. Special tokens spell nothing (identity rows); padding is masked by length, never by id.

Ops are what a rule reports about positions ("a `</answer>` ended here", "a `<` started here"); each is
recorded with two flags, whether it fired on the token's first byte and on its last, so a rule can tell "the
byte before this one is in the previous token" from "... in this token". The end of the text is a virtual
byte (EOT) applied after the scan; it resolves look-aheads such as a word boundary. State-heavy bookkeeping
(counts, tiers) belongs in the scan's carry, driven by ops, so that tables stay small (a 152k vocabulary
times tens of states). The rules themselves are in rl/automata.py.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


EOT = 256  # the virtual end-of-text byte
_OP_BITS = 6  # per op: 4 bits of op id, 1 bit "on the token's last byte", 1 bit "on its first byte"
_OPS_PER_WORD = 5  # 30 bits of an int32; a field is 0 exactly when no op is there
_MAX_OPS = 64  # ops one token may emit from one state; the scan unrolls the busiest real token's count, not this cap

ASCII_WS = frozenset(b" \t\n\r\x0b\x0c")  # str.strip() / the gate's whitespace, ASCII part
REGEX_WS = ASCII_WS | frozenset(range(0x1c, 0x20))  # Python's \s on str, ASCII part
WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") | frozenset(range(0x80, 256))
DIGITS = frozenset(b"0123456789")
ALL = frozenset(range(256))


# ----------------------------------------------------------------------------------------- tiny regex -> NFA


class _Nfa:
  """Thompson NFA over bytes with labelled accept nodes and the two word-boundary assertions."""

  def __init__(self):
    self.edges: list[list[tuple[frozenset | None, int]]] = []  # (byte set, or None = epsilon; target)
    self.marks: dict[int, int] = {}  # node -> event id fired when the node is reached
    self.word_end: dict[int, int] = {}  # node -> target, passable when the next byte is not a word byte
    self.word_start: dict[int, int] = {}  # node -> target, passable when the previous byte is not a word byte

  def node(self) -> int:
    self.edges.append([])
    return len(self.edges) - 1


def lit(text: str | bytes, icase: bool = False):
  data = text.encode() if isinstance(text, str) else text
  sets = []
  for b in data:
    c = chr(b)
    sets.append(frozenset({ord(c.lower()), ord(c.upper())}) if icase and c.isascii() and c.isalpha() else
                frozenset({b}))
  return ("seq", [("set", s) for s in sets])


def cls(bytes_: frozenset | bytes | str):
  return ("set", frozenset(bytes_.encode() if isinstance(bytes_, str) else bytes_))


def seq(*parts):
  return ("seq", list(parts))


def alt(*parts):
  return ("alt", list(parts))


def opt(part):
  return ("opt", part)


def star(part):
  return ("star", part)


def plus(part):
  return seq(part, star(part))


def mark(event: int):
  return ("mark", event)


WORD_END = ("word_end",)
WORD_START = ("word_start",)


def _build(nfa: _Nfa, ast, start: int) -> int:
  """Adds `ast` after node `start`; returns its end node."""
  kind = ast[0]
  if kind == "set":
    end = nfa.node()
    nfa.edges[start].append((ast[1], end))
    return end
  if kind == "seq":
    for part in ast[1]:
      start = _build(nfa, part, start)
    return start
  if kind == "alt":
    end = nfa.node()
    for part in ast[1]:
      nfa.edges[_build(nfa, part, start)].append((None, end))
    return end
  if kind == "opt":
    end = _build(nfa, ast[1], start)
    nfa.edges[start].append((None, end))
    return end
  if kind == "star":
    loop = nfa.node()
    nfa.edges[start].append((None, loop))
    nfa.edges[_build(nfa, ast[1], loop)].append((None, loop))
    return loop
  if kind == "mark":
    end = nfa.node()
    nfa.edges[start].append((None, end))
    nfa.marks[end] = ast[1]
    return end
  if kind in ("word_end", "word_start"):
    gate, end = nfa.node(), nfa.node()
    nfa.edges[start].append((None, gate))
    getattr(nfa, kind)[gate] = end
    return end
  raise ValueError(f"unknown pattern node {ast!r}")


class Searcher:
  """All matches of a set of patterns anywhere in a byte stream (unanchored), as events at their ends.

  A state is the frozenset of live NFA nodes; `step` consumes one byte (or EOT) and returns
  (state, early events, events): early events are matches whose word-boundary look-ahead this byte
  resolved (they ended before it), events the matches ending on it. Patterns must not match the empty string.
  """

  def __init__(self, *patterns):
    self.nfa = _Nfa()
    self.start_node = self.nfa.node()
    for p in patterns:
      _build(self.nfa, p, self.start_node)
    self.start = self._closure({self.start_node}, prev_word=False)[0]
    self._memo: dict = {}

  def _closure(self, nodes, prev_word: bool) -> tuple[frozenset, tuple[int, ...]]:
    seen, stack, events = set(nodes), list(nodes), []
    while stack:
      n = stack.pop()
      targets = [t for s, t in self.nfa.edges[n] if s is None]
      if n in self.nfa.word_start and not prev_word:
        targets.append(self.nfa.word_start[n])
      for t in targets:
        if t not in seen:
          seen.add(t)
          stack.append(t)
    for n in seen:
      if n in self.nfa.marks:
        events.append(self.nfa.marks[n])
    # Nodes that can neither consume a byte nor fire later are dead weight: dropping them keeps equivalent
    # states equal (fewer states before minimisation).
    live = frozenset(n for n in seen if n in self.nfa.word_end or any(s is not None for s, _ in self.nfa.edges[n]))
    return live, tuple(sorted(events))

  def step(self, state: frozenset, byte: int) -> tuple[frozenset, tuple[int, ...], tuple[int, ...]]:
    key = (state, byte)
    if key not in self._memo:
      self._memo[key] = self._step(state, byte)
    return self._memo[key]

  def _step(self, state: frozenset, byte: int) -> tuple[frozenset, tuple[int, ...], tuple[int, ...]]:
    # Word-end assertions look at the byte about to be consumed (EOT counts as a non-word byte).
    pre_events: tuple[int, ...] = ()
    passed = [self.nfa.word_end[n] for n in state if n in self.nfa.word_end]
    if passed and (byte == EOT or byte not in WORD):
      _, pre_events = self._closure(passed, prev_word=True)
    if byte == EOT:
      return self.start, pre_events, ()
    moved = {t for n in state for s, t in self.nfa.edges[n] if s is not None and byte in s}
    moved.add(self.start_node)
    live, events = self._closure(moved, prev_word=byte in WORD)
    return live, pre_events, events


# --------------------------------------------------------------------------------------------- compilation


@dataclasses.dataclass(frozen=True)
class ByteMachine:
  """A deterministic machine over bytes: `step(state, byte) -> (state, ops)`; byte EOT ends the text.

  `outputs(state)` maps the state after EOT to a tuple of small ints (the machine's per-row results). Ops
  are ids 1..15 naming `op_names[id - 1]`; a run of one op listed in `collapse` within a token keeps only its
  last occurrence (ops whose repetition changes nothing, such as "a newline was seen"), so tokens of many
  newlines or braces do not overflow the code.
  """

  name: str
  start: Hashable
  step: Callable[[Hashable, int], tuple[Hashable, tuple[int, ...]]]
  outputs: Callable[[Hashable], tuple[int, ...]]
  output_names: tuple[str, ...]
  op_names: tuple[str, ...]
  collapse: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ByteDfa:
  """A ByteMachine enumerated and minimised: S states, state 0 the start."""

  trans_Zx256: np.ndarray  # int32
  ops_Zx256: np.ndarray  # int32 index into op_seqs
  eot_ops_Z: np.ndarray  # int32 index into op_seqs
  outputs_ZxO: np.ndarray  # int32: outputs of eot(state)
  op_seqs: tuple[tuple[int, ...], ...]

  @property
  def num_states(self) -> int:
    return self.trans_Zx256.shape[0]


def _intern(table: dict, key) -> int:
  if key not in table:
    table[key] = len(table)
  return table[key]


def enumerate_machine(machine: ByteMachine, max_states: int = 20000) -> ByteDfa:
  """Every reachable state of `machine` (breadth first from its start), then Moore-minimised."""
  index = {machine.start: 0}
  states = [machine.start]
  op_ids: dict[tuple[int, ...], int] = {(): 0}
  trans, ops, eot_ops, outs = [], [], [], []
  i = 0
  while i < len(states):
    s = states[i]
    row_t, row_o = [], []
    for b in range(256):
      nxt, emitted = machine.step(s, b)
      if nxt not in index:
        if len(states) >= max_states:
          raise ValueError(f"automaton {machine.name!r} has more than {max_states} states; simplify its rule.")
        index[nxt] = len(states)
        states.append(nxt)
      row_t.append(index[nxt])
      row_o.append(_intern(op_ids, tuple(emitted)))
    final, emitted = machine.step(s, EOT)
    trans.append(row_t)
    ops.append(row_o)
    eot_ops.append(_intern(op_ids, tuple(emitted)))
    outs.append(tuple(machine.outputs(final)))
    i += 1
  op_seqs = tuple(sorted(op_ids, key=op_ids.get))
  return _minimise(np.asarray(trans, np.int32), np.asarray(ops, np.int32), np.asarray(eot_ops, np.int32),
                   np.asarray(outs, np.int32).reshape(len(states), -1), op_seqs)


def _minimise(trans, ops, eot_ops, outs, op_seqs) -> ByteDfa:
  """Moore partition refinement: states with the same outputs, ops and successor classes merge."""
  S = trans.shape[0]
  _, block = np.unique(np.concatenate([outs, eot_ops[:, None]], axis=1), axis=0, return_inverse=True)
  block = block.reshape(-1)
  while True:
    sig = np.concatenate([block[:, None], block[trans], ops], axis=1)
    _, new_block = np.unique(sig, axis=0, return_inverse=True)
    new_block = new_block.reshape(-1)
    if new_block.max() == block.max():
      break
    block = new_block
  # Renumber so the start state (0) stays 0, in order of first appearance.
  order = {}
  for b in block:
    order.setdefault(int(b), len(order))
  block = np.asarray([order[int(b)] for b in block], np.int32)
  n = len(order)
  rep = np.zeros(n, np.int64)
  rep[block[::-1]] = np.arange(S)[::-1]  # the first state of each class
  return ByteDfa(block[trans[rep]], ops[rep], eot_ops[rep], outs[rep], op_seqs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenAutomaton:
  """A ByteDfa lifted to tokens (device arrays; a pytree, so it can be a jit argument).

  next_VxZ: int16/int32 next state. code_VxZxW: int32 packed ops: op j (0-based, in emission order) in word
  j // 5, bits [6 (j % 5), 6 (j % 5) + 6), as `op_id << 2 | on_last_byte << 1 | on_first_byte` (0 = no op);
  W words, as many as the busiest token needs.
  eot_code_ZxW: the ops of the EOT step (both flags clear). outputs_ZxO: per-row results of the
  state after EOT. nonempty_V: the token spells at least one byte. newline_V: the token spells exactly "\\n".
  max_ops: the most ops any single lookup emits (static: the scan unrolls that many).
  """

  next_VxZ: jax.Array
  code_VxZxW: jax.Array
  eot_code_ZxW: jax.Array
  outputs_ZxO: jax.Array
  nonempty_V: jax.Array
  newline_V: jax.Array
  max_ops: int = dataclasses.field(metadata=dict(static=True), default=0)
  output_names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True), default=())
  op_names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True), default=())


def special_token_ids(tokenizer) -> tuple[int, ...]:
  """Ids of the tokenizer's special added tokens: the ones a decode with skip_special_tokens drops."""
  return tuple(sorted(int(i) for i, tok in tokenizer.hf.added_tokens_decoder.items() if tok.special))


def compile_tokens(dfa: ByteDfa, token_bytes: Sequence[bytes], special_ids: Sequence[int], machine: ByteMachine,
                   chunk: int = 4096) -> TokenAutomaton:
  """Lifts a byte DFA to a token table by running each token's bytes from every state (host, numpy).

  Args:
    dfa: from `enumerate_machine`.
    token_bytes: bytes per token id (`Tokenizer.token_bytes_table(model vocab size)`); b"" for padded ids.
    special_ids: ids that spell nothing (`special_token_ids`).
    machine: the machine `dfa` was built from (names, collapsible ops).
  """
  V, S = len(token_bytes), dfa.num_states
  special = set(int(i) for i in special_ids)
  for i in special:
    if not 0 <= i < V:
      raise ValueError(f"special id {i} is outside the token table of {V} ids.")
  if len(machine.op_names) > 15:
    raise ValueError(f"automaton {machine.name!r} has {len(machine.op_names)} ops; at most 15 fit the code.")
  width = max([1] + [len(q) for q in dfa.op_seqs])
  seq_ops = np.zeros((len(dfa.op_seqs), width), np.int64)  # byte-level op sequences, 0-padded
  for k, q in enumerate(dfa.op_seqs):
    seq_ops[k, :len(q)] = q
  collapsible = np.zeros(16, bool)
  collapsible[list(machine.collapse)] = True
  next_ZxV = np.tile(np.arange(S, dtype=np.int32)[:, None], (1, V))
  code_ZxV = np.zeros((S, V), np.int64)
  lengths = np.asarray([0 if i in special else len(b) for i, b in enumerate(token_bytes)])
  by_len: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    if n:
      by_len.setdefault(int(n), []).append(i)
  mask6 = (1 << _OP_BITS) - 1
  max_ops = 0
  for n, ids in by_len.items():
    for c0 in range(0, len(ids), chunk):
      idx = np.asarray(ids[c0:c0 + chunk])
      data = np.frombuffer(b"".join(token_bytes[i] for i in idx), np.uint8).reshape(len(idx), n)
      state = np.broadcast_to(np.arange(S, dtype=np.int32)[:, None], (S, len(idx)))
      code = np.zeros((S, len(idx)), np.int64)
      count = np.zeros((S, len(idx)), np.int64)
      last_op = np.zeros((S, len(idx)), np.int64)
      for j in range(n):
        k = dfa.ops_Zx256[state, data[None, :, j]]
        for p in range(width):
          op = seq_ops[k, p]
          valid = op > 0
          if not valid.any():
            continue
          field = (op << 2) | (2 if j == n - 1 else 0) | (1 if j == 0 else 0)
          merge = valid & collapsible[op] & (last_op == op) & (count > 0)
          slot = np.where(merge, count - 1, count)
          code = np.where(valid, (code & ~(mask6 << (_OP_BITS * slot))) | (field << (_OP_BITS * slot)), code)
          count = count + (valid & ~merge)
          last_op = np.where(valid, op, last_op)
        state = dfa.trans_Zx256[state, data[None, :, j]]
      if count.max(initial=0) > _MAX_OPS:
        bad = idx[int(np.argmax(count.max(axis=0)))]
        raise ValueError(f"automaton {machine.name!r}: token {bad} ({token_bytes[bad]!r}) emits more than "
                         f"{_MAX_OPS} ops from one state; mark repeatable ops in `collapse` or raise _MAX_OPS.")
      next_ZxV[:, idx] = state
      code_ZxV[:, idx] = code
      max_ops = max(max_ops, int(count.max(initial=0)))
  eot_code = np.zeros(S, np.int64)
  for st, k in enumerate(dfa.eot_ops_Z):
    q = dfa.op_seqs[k]
    if len(q) > _MAX_OPS:
      raise ValueError(f"automaton {machine.name!r} emits {len(q)} ops at the end of the text; at most {_MAX_OPS}.")
    for j, op in enumerate(q):
      eot_code[st] |= (op << 2) << (_OP_BITS * j)
    max_ops = max(max_ops, len(q))
  W = max(1, -(-max_ops // _OPS_PER_WORD))
  word_mask = (1 << (_OP_BITS * _OPS_PER_WORD)) - 1
  words = lambda c: np.stack([(c >> (_OP_BITS * _OPS_PER_WORD * w)) & word_mask for w in range(W)], -1)  # noqa: E731
  state_dtype = jnp.int16 if S < 2 ** 15 else jnp.int32
  return TokenAutomaton(
      next_VxZ=jnp.asarray(next_ZxV.T, state_dtype), code_VxZxW=jnp.asarray(words(code_ZxV.T).astype(np.int32)),
      eot_code_ZxW=jnp.asarray(words(eot_code).astype(np.int32)),
      outputs_ZxO=jnp.asarray(dfa.outputs_ZxO), nonempty_V=jnp.asarray(lengths > 0),
      newline_V=jnp.asarray([i not in special and b == b"\n" for i, b in enumerate(token_bytes)]),
      max_ops=max_ops, output_names=machine.output_names, op_names=machine.op_names)


def compile_machine(machine: ByteMachine, token_bytes: Sequence[bytes], special_ids: Sequence[int]) -> TokenAutomaton:
  return compile_tokens(enumerate_machine(machine), token_bytes, special_ids, machine)


# ------------------------------------------------------------------------------------------------- running


def decode_op(code_NxW, j: int):
  """(op id, on first byte, on last byte, present) of the j-th op of packed codes (int32 [N, W])."""
  field = (code_NxW[:, j // _OPS_PER_WORD] >> (_OP_BITS * (j % _OPS_PER_WORD))) & ((1 << _OP_BITS) - 1)
  return field >> 2, (field & 1) == 1, (field & 2) == 2, field != 0


def scan(automaton: TokenAutomaton, tokens_NxT: jax.Array, lengths_N: jax.Array, init, apply_op):
  """Runs the automaton over each row's first lengths_N tokens; returns (final carry, EOT state per row).

  `apply_op(carry, op_id, t, first, last, last_nonempty, present)` folds one op into the caller's carry
  (arrays over rows); `t` is the token index (-1 for the EOT step), `last_nonempty` the index of the last
  token before t that spells something (-1 if none).
  """
  N, T = tokens_NxT.shape
  state0 = jnp.zeros((N,), automaton.next_VxZ.dtype)
  last0 = jnp.full((N,), -1, jnp.int32)

  def body(c, xs):
    state, last_nonempty, prev_nonempty, user = c
    t, tok_N = xs
    active = t < lengths_N
    tok_N = jnp.where(active, tok_N, 0)
    code = jnp.where(active[:, None], automaton.code_VxZxW[tok_N, state.astype(jnp.int32)], 0)
    for j in range(automaton.max_ops):
      op, first, last, present = decode_op(code, j)
      user = apply_op(user, op, jnp.full((N,), t, jnp.int32), first, last, last_nonempty, present)
    state = jnp.where(active, automaton.next_VxZ[tok_N, state.astype(jnp.int32)], state)
    grows = active & automaton.nonempty_V[tok_N]
    prev_nonempty = jnp.where(grows, last_nonempty, prev_nonempty)
    last_nonempty = jnp.where(grows, t, last_nonempty)
    return (state, last_nonempty, prev_nonempty, user), None

  (state, last_nonempty, prev_nonempty, user), _ = jax.lax.scan(
      body, (state0, last0, last0, init), (jnp.arange(T, dtype=jnp.int32), tokens_NxT.T.astype(jnp.int32)))
  code = automaton.eot_code_ZxW[state.astype(jnp.int32)]
  for j in range(automaton.max_ops):
    op, first, last, present = decode_op(code, j)
    user = apply_op(user, op, jnp.full((N,), -1, jnp.int32), first, last, last_nonempty, present)
  return user, state.astype(jnp.int32), last_nonempty, prev_nonempty


def outputs(automaton: TokenAutomaton, state_N, name: str):
  """The machine output `name` of each row's final state."""
  return automaton.outputs_ZxO[state_N, automaton.output_names.index(name)]


def append(buf_NxY, count_N, value_N, where_N):
  """Writes value at position count (when it fits) and bumps count, where `where_N`."""
  K = buf_NxY.shape[1]
  hit_NxY = where_N[:, None] & (jnp.arange(K)[None, :] == count_N[:, None])
  return jnp.where(hit_NxY, value_N[:, None], buf_NxY), count_N + where_N.astype(count_N.dtype)
