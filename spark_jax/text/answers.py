"""Final-answer extraction from a model response: the `Answer:` line, the last `\\boxed{}`, or a math-like last line.

Text functions with no model or grader behind them; Stage I curation, the RL rewards and the math
evaluations all extract answers here before `spark_jax.evals.grading` decides equivalence.
"""

from __future__ import annotations

import re

from spark_jax.text.verdicts import strip_thinking


_ANSWER_LINE_RE = re.compile(r"Answer:\s*(.+?)(?:\n|$)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_LAST_LINE_MAX_CHARS = 50
_LAST_LINE_MARKERS = ("=", "$", "\\", "{", "}")


def _match_brace(text: str, open_idx: int) -> int | None:
  """Returns the index of the `}` closing the `{` at `open_idx`, or None if it never closes.

  A backslash escapes the next character, so `\\{` and `\\}` (literal braces in set answers such as
  `\\{1,2\\}`) do not count, while `\\\\{` (a LaTeX line break followed by a group) does.
  """
  depth = 0
  i = open_idx
  n = len(text)
  while i < n:
    c = text[i]
    if c == "\\":
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def last_boxed(text: str | None) -> str | None:
  """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched.

  Nested braces are matched (`\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`), which the authors' regex did
  not do. A trailing box that never closes (a truncated generation) is skipped in favour of the previous
  complete one. The brace-less form `\\boxed 5` yields the token after the space. Returns None when no
  complete box exists; an empty box `\\boxed{}` yields "".
  """
  if not text:
    return None
  for m in reversed(list(_BOXED_RE.finditer(text))):
    i = m.end()
    while i < len(text) and text[i] in " \t":
      i += 1
    if i < len(text) and text[i] == "{":
      close = _match_brace(text, i)
      if close is not None:
        return text[i + 1 : close].strip()
    elif i > m.end():  # `\boxed 5`: the token up to whitespace or `$`.
      token = re.match(r"[^\s$]+", text[i:])
      if token:
        return token.group(0)
  return None




def _clean_answer_line(s: str) -> str:
  """Strips markdown emphasis, math delimiters and a final period from an `Answer:` capture."""
  s = s.strip().strip("* ").strip()
  if s.endswith("."):
    s = s[:-1].rstrip()
  if s.startswith("\\[") and s.endswith("\\]"):
    s = s[2:-2].strip()
  elif s.startswith("\\(") and s.endswith("\\)"):
    s = s[2:-2].strip()
  if s.count("$") == 2 and s.startswith("$") and s.endswith("$"):
    s = s.strip("$").strip()
  if s.endswith("."):
    s = s[:-1].rstrip()
  return s


def extract_answer(text: str | None) -> str | None:
  """Extracts the final answer from a model response (docs/method.md, answer checking), or None.

  Rules, in order:
    0. The reasoning trace is removed by the one think rule, `spark_jax.text.verdicts.split_thinking`
       (a trace may mention candidate answers): only the text after the first `</think>` counts; a response
       that opens `<think>` and never closes it has no answer (unless a `## Step 1:` block follows the
       trace); a response without any tag is read whole.
    1. The first line matching `Answer:\\s*(.+?)(\\n|$)` (case-insensitive). Deviation from the authors'
       script, for robustness: when the captured text contains a `\\boxed{}`, its content is returned
       (so "Final Answer: The final answer is $\\boxed{5}$" gives "5"); markdown emphasis and `$` are
       stripped; and a capture that is empty after stripping ("**Final Answer:**" followed by a display
       block) falls through to rule 2 instead of returning "**".
    2. The last complete `\\boxed{...}`, nested braces matched (see `last_boxed`).
    3. The last non-empty line, if shorter than 50 characters and containing one of `= $ \\ { }`.
  """
  if text is None:
    return None
  text = strip_thinking(str(text))
  m = _ANSWER_LINE_RE.search(text)
  if m:
    captured = m.group(1)
    if "\\boxed" in captured or "\\fbox" in captured:
      boxed = last_boxed(captured)
      if boxed is None:  # The box opens on this line and closes on a later one.
        boxed = last_boxed(text[m.start(1) :])
      if boxed:
        return boxed
    cleaned = _clean_answer_line(captured)
    if cleaned:
      return cleaned
  boxed = last_boxed(text)
  if boxed:
    return boxed
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if lines:
    last = lines[-1]
    if len(last) < _LAST_LINE_MAX_CHARS and any(c in last for c in _LAST_LINE_MARKERS):
      return last
  return None
