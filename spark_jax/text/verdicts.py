"""Parsers for verifier, PRM-CoT, PRM (no CoT) and ORM outputs.

One parser per output format, all built from the same few regexes:

  * `parse_verification`  teacher / PRM-CoT / ThinkPRM / merged-verification text:
                          `## Step k: ...` blocks closed by `**This step is correct.|incorrect.**`, then
                          `**Verification: Is the answer correct (Yes/No)? Yes|No**`.
  * `parse_prm_output`    no-CoT PRM text: `Step k: Correct|Incorrect` lines, then the same final line.
  * `parse_orm_output`    ORM text: exactly `Yes` or `No`.

Parsed step verdicts are returned as `steps: list[bool]`, where `steps[i]` is True when step i+1 was judged
correct, and `final: bool | None` (None = no verdict found). ThinkPRM outputs need no parser of their own:
`parse_verification` removes the reasoning trace first, as it does for the thinking verifier.

Decisions (documented because verifier outputs are messy and every choice changes the training labels):

  1. Thinking trace (`split_thinking` / `strip_thinking`, the one think-stripper of the code base; answer
     extraction, ProcessBench and Stage I all call it). One rule, the authors':
       * `</think>` present: everything up to and including the FIRST `</think>` is the trace (that also
         covers chat templates that put the opening `<think>` in the prompt); everything after it is the
         visible text, verbatim. A later `<think>`/`</think>` pair is part of the visible text (models that
         think twice are rare, and rewriting what the model showed would make the PRM-CoT target differ
         from the text it was parsed from).
       * `<think>` opened but never closed (output truncated inside the trace, or the tag forgotten): the
         visible text starts at the first `\n\n## Step 1:` (that header only starts a real
         verification); without it there is no visible text ("": nothing after an unclosed trace is
         trusted).
       * Neither tag (a generator solution, a policy response, a PRM or ORM output without thinking, a
         verifier run with thinking off): there is no trace and the whole text is visible. A chat template
         that opens `<think>` in the prompt leaves a completion that never closes it indistinguishable from
         this case; callers of such templates must prepend the opening tag before stripping.
  2. Step headers come in two tiers. Structured headers: markdown (`## Step k`, any 1-6 `#`, optional bold)
     and bold (`**Step k:**`, `**Step k: title**`), both counted when they start a line, so a verification
     that mixes the styles keeps every step. Plain headers (`Step k:` / `Step k.` / `Step k)` at a line
     start) are used only when no structured header occurs, so a plain `Step 2: ...` line quoted from the
     student's solution inside a structured verification is not taken for a header.
  3. A step's verdict is searched only inside its own block (from its header to the next header), so a
     block without a verdict yields no verdict instead of borrowing the next step's one (a weakness of a
     single lazy `Step k: .*? verdict` regex). Inside a block a bold marker wins over a plain
     `This step is correct` sentence, and among markers of the same kind the last one wins (a verifier that
     revises itself writes the revised verdict last). A plain (fallback) sentence whose sentence also holds
     a negation (`not`, `n't`, `never`, `no`, `cannot`, `hardly`), as in "I don't think this step is
     correct", gives the step NO verdict: a negated sentence is never read as its opposite either, since
     "not sure this step is correct" does not mean incorrect.
  4. Duplicated step numbers: the later block with a verdict overwrites the earlier one (as the authors'
     dict keyed by "Step k" does); a later duplicate without a verdict erases nothing.
  5. Non-contiguous step numbers: the step vector is the contiguous run 1, 2, ..., K of numbers that have
     a verdict; it ends at the first missing number and later numbers are discarded. A gap means a step was
     skipped or its header was not recognised, so the position-to-step alignment after it cannot be
     trusted, and majority voting is per position. Step 0 is ignored (steps are numbered from 1).
     `parse_step_verdict_map` returns the raw number -> verdict map for callers that want more.
  6. Final verdict: four pattern tiers (the authors' order): `Verification: Is the answer correct ...? X`,
     then `Is the answer correct ...? X`, then `answer correct ...? X`, then a bare `? X` at the very end of
     the text. The first tier with any match decides, and within it the FIRST match counts, as in the
     authors' parser (a verifier that states its verdict and then keeps talking is read by its first
     statement). Bold, `\\boxed{X}` and case variants are accepted; `No` must be a whole word (`Not`,
     `None` do not count).
  7. ORM: the whole stripped output must be `yes` or `no` (case-insensitive), exactly as the RL reward
     function requires; anything else is None. No thinking removal, no punctuation tolerance.
  8. A solution's own step count (`count_solution_steps`): the contiguous run 1..K of the step numbers of
     its line-start `Step k` headers, any style (markdown, bold or plain, mixed); 0 when it has none. The
     generator is asked to number its steps this way, and Stage I counts the verifications whose number of
     step verdicts differs from it.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_UNCLOSED_THINK_RESUME = "\n\n## Step 1:"

# Step headers (decision 2), structured tier first. Group 1 = the step number.
_STRUCTURED_HEADER = r"^[ \t]*(?:#{1,6}[ \t]*(?:\*\*|__)?|\*\*|__)[ \t]*Step[ \t]+(\d+)\b"  # ## Step 3 / **Step 3:**
_PLAIN_HEADER = r"^[ \t]*Step[ \t]+(\d+)[ \t]*[:.)\-\u2013\u2014]"  # Step 3: title
_STEP_HEADER_TIERS = tuple(re.compile(p, re.MULTILINE | re.IGNORECASE) for p in (_STRUCTURED_HEADER, _PLAIN_HEADER))
# Any header style, for counting a solution's own steps (decision 8).
_ANY_HEADER_RE = re.compile(f"{_STRUCTURED_HEADER}|{_PLAIN_HEADER}", re.MULTILINE | re.IGNORECASE)

# Per-step verdict marker of the verification format; `bold_before`/`bold_word` tell bold from plain prose.
_STEP_VERDICT_RE = re.compile(
    r"(?P<bold_before>\*\*|__)?[ \t]*\bThis step is[ \t]+(?P<bold_word>\*\*|__)?[ \t]*"
    r"(?P<verdict>correct|incorrect)\b",
    re.IGNORECASE)
# A negation in the sentence of a plain (fallback) verdict sentence voids it (decision 3).
_NEGATION_RE = re.compile(r"\b(?:not|never|no|cannot|hardly)\b|n['\u2019]t\b", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[.!?;\n]")

# No-CoT PRM step line (docs/method.md §3.2): `Step 3: Incorrect`, optionally bold.
_PRM_STEP_LINE_RE = re.compile(r"\bStep\s+(\d+)\s*:\s*(?:\*\*)?\s*(correct|incorrect)\b", re.IGNORECASE)

# Final verdict tiers (decision 6). Group 1 = yes/no. `[^\n?]*` spans "(Yes/No)" without crossing lines.
_VERDICT_TAIL = r"[ \t*]*(?:\\boxed\{)?[ \t*]*(yes|no)\b"
_FINAL_VERDICT_TIERS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"Verification:?[\s*]*Is the answer correct[^\n?]*\?" + _VERDICT_TAIL,
        r"Is the answer correct[^\n?]*\?" + _VERDICT_TAIL,
        r"answer correct[^\n?]*\?" + _VERDICT_TAIL,
        r"\?[ \t*]*(?:\\boxed\{)?[ \t*]*(yes|no)[ \t*.!}]*\Z",
    ))


def split_thinking(text: str) -> tuple[str | None, str]:
  """Splits a model output into (reasoning trace, visible text) by the one rule of decision 1.

  Returns:
    (thinking, visible): `thinking` is the trace closed by the first `</think>` (without its opening tag),
    stripped, or None when no `</think>` occurs; `visible` is the text a parser, an answer extractor or a
    PRM-CoT target sees, stripped of surrounding whitespace ("" after a trace that never closes and has no
    `## Step 1:` to resume at).
  """
  close = text.find(THINK_CLOSE)
  if close >= 0:
    before = text[:close]
    opening = before.find(THINK_OPEN)
    thinking = before[opening + len(THINK_OPEN):] if opening >= 0 else before
    return thinking.strip(), text[close + len(THINK_CLOSE):].strip()
  if THINK_OPEN in text:
    resume = text.find(_UNCLOSED_THINK_RESUME)
    return None, (text[resume:].strip() if resume >= 0 else "")
  return None, text.strip()


def strip_thinking(text: str) -> str:
  """The visible part of a model output: the `<think>` trace removed (decision 1)."""
  return split_thinking(text)[1]


def contiguous_steps(verdicts: Mapping[int, bool]) -> list[bool]:
  """Step vector [v_1, ..., v_n] from a step-number -> verdict map; stops at the first gap (decision 5)."""
  steps = []
  while len(steps) + 1 in verdicts:
    steps.append(verdicts[len(steps) + 1])
  return steps


def _negated(block: str, marker: re.Match) -> bool:
  """Whether the sentence around a plain verdict sentence holds a negation (decision 3)."""
  starts = [m.end() for m in _SENTENCE_END_RE.finditer(block, 0, marker.start())]
  end = _SENTENCE_END_RE.search(block, marker.end())
  sentence = block[starts[-1] if starts else 0:end.start() if end else len(block)]
  return _NEGATION_RE.search(sentence) is not None


def _block_verdict(block: str) -> bool | None:
  markers = list(_STEP_VERDICT_RE.finditer(block))
  if not markers:
    return None
  bold = [m for m in markers if m.group("bold_before") or m.group("bold_word")]
  chosen = (bold or markers)[-1]
  if not bold and _negated(block, chosen):
    return None
  return chosen.group("verdict").lower() == "correct"


def _step_verdicts(visible: str) -> dict[int, bool]:
  for header_re in _STEP_HEADER_TIERS:
    headers = list(header_re.finditer(visible))
    if headers:
      break
  else:
    return {}
  verdicts: dict[int, bool] = {}
  for header, next_header in zip(headers, headers[1:] + [None]):
    block = visible[header.end():next_header.start() if next_header else len(visible)]
    verdict = _block_verdict(block)
    if verdict is not None:  # decision 4: later blocks overwrite, empty blocks erase nothing.
      verdicts[int(header.group(1))] = verdict
  return verdicts


def _final_verdict(visible: str) -> bool | None:
  for pattern in _FINAL_VERDICT_TIERS:
    match = pattern.search(visible)  # decision 6: the first match of the first tier that matches.
    if match:
      return match.group(1).lower() == "yes"
  return None


def count_solution_steps(solution: str) -> int:
  """A solution's own step count K (decision 8): its line-start `Step 1..K` headers, any style; 0 if none.

  `solution` is the visible text (Stage I stores solutions with their trace already stripped).
  """
  numbers = {int(m.group(1) or m.group(2)) for m in _ANY_HEADER_RE.finditer(solution)}
  return len(contiguous_steps(dict.fromkeys(numbers, True)))


def parse_final_verdict(text: str) -> bool | None:
  """The final Yes/No verdict of a verifier, PRM or PRM-CoT output (True = Yes); None when absent."""
  return _final_verdict(strip_thinking(text))


def parse_step_verdict_map(text: str) -> dict[int, bool]:
  """Raw step number -> verdict map of a verification, before the contiguity rule of decision 5."""
  return _step_verdicts(strip_thinking(text))


def parse_verification(text: str) -> dict:
  """Parses a teacher verification / PRM-CoT / ThinkPRM / merged verification output.

  Args:
    text: the raw model output, with or without its `<think>` trace.

  Returns:
    {"steps": list[bool], "final": bool | None}: steps[i] is True when step i+1 was judged correct (a
    contiguous run from step 1, see decision 5), final is the Yes/No verdict (None when missing).
  """
  visible = strip_thinking(text)
  return {"steps": contiguous_steps(_step_verdicts(visible)), "final": _final_verdict(visible)}


def parse_prm_output(text: str) -> dict:
  """Parses a no-CoT PRM output: `Step k: Correct|Incorrect` lines plus the final verdict line.

  Duplicated and non-contiguous step numbers follow decisions 4 and 5 (later line wins, stop at a gap).

  Returns:
    {"steps": list[bool], "final": bool | None}, as `parse_verification`.
  """
  visible = strip_thinking(text)
  verdicts = {int(number): word.lower() == "correct" for number, word in _PRM_STEP_LINE_RE.findall(visible)}
  return {"steps": contiguous_steps(verdicts), "final": _final_verdict(visible)}


def parse_orm_output(text: str) -> bool | None:
  """Parses an ORM output: True for exactly "Yes", False for exactly "No" (case and outer spaces aside)."""
  answer = text.strip().lower()
  if answer == "yes":
    return True
  if answer == "no":
    return False
  return None


def step_derived_verdict(steps: Sequence[bool]) -> bool | None:
  """Outcome implied by step labels: all correct => True (Yes), any incorrect => False, no steps => None."""
  if not steps:
    return None
  return all(steps)
