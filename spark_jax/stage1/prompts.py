"""Prompt texts for SPARK Stage I (generator, verifier, critic, merger) and for the generative reward models.

The wording is our own; only the structure follows the SPARK pipeline (docs/method.md §2.2, 2.5, 2.6, 3.2, 6). The
output markers are different: they are a *format* that the parsers (`spark_jax.text.verdicts`), the
aggregated training targets and the trained reward models all depend on, so they are defined once here and
must match byte for byte:

  * step block header        `## Step k: <title>`
  * step verdict             `**This step is correct.**` / `**This step is incorrect.**`
  * final verdict            `**Verification: Is the answer correct (Yes/No)? Yes|No**`
  * PRM (no CoT) step line   `Step k: Correct` / `Step k: Incorrect`

Every function returns the plain *user message* content. Chat templating (system prompt, special tokens,
thinking switches) belongs to the model-serving code, so these strings are model agnostic.

Problem and solution texts are inserted with f-strings, never with `str.format`, because math problems are
full of `{` and `}`.
"""

from __future__ import annotations

from spark_jax.text.rm import (FINAL_VERDICT_QUESTION, STEP_CORRECT_MARKER, STEP_INCORRECT_MARKER, final_verdict_line,
                               step_marker)
from spark_jax.text.verdicts import strip_thinking

# --------------------------------------------------------------------------------------------------------
# Generator (docs/method.md §2.2)
# --------------------------------------------------------------------------------------------------------


def generator_prompt(problem: str) -> str:
  """Asks for a step-numbered solution ending in an `Answer:` line.

  The verifier grades the generator's own "Step k" numbering (SPARK never splits solutions
  programmatically), so the numbering request is what defines the steps of the whole pipeline. The
  `Answer:` line is what the ground-truth checker extracts first.
  """
  return (
      "Work out the following math problem one step at a time. The final line of your response must read "
      "Answer: $ANSWER (without quotes), with $ANSWER replaced by your answer to the problem.\n"
      "\n"
      f"Problem: {problem}\n"
      "\n"
      "Lay the solution out as numbered steps (Step 1, Step 2, and so on), and justify what you do in each "
      "step.\n"
      'Put the answer on its own line after "Answer:"; there is no need for a \\boxed command.\n'
      "\n"
      "Solution:"
  )


# --------------------------------------------------------------------------------------------------------
# Verifier, with and without the expected answer (docs/method.md §2.5, 2.6 reference-guided, 6.2)
# --------------------------------------------------------------------------------------------------------

# Worked example 1: a 3-step solution in which every step is right.
_EXAMPLE_1_QUESTION = (
    "The perimeter of a rectangle is 36 cm, and its length is twice its width. What is the area of the "
    "rectangle in square centimeters?"
)
_EXAMPLE_1_ANSWER = "72"
_EXAMPLE_1_SOLUTION = (
    "Step 1: Let the width be w cm, so the length is 2w cm. The perimeter is 2(w + 2w) = 6w, so 6w = 36 "
    "and w = 6.\n"
    "Step 2: The length is 2w = 2 × 6 = 12 cm.\n"
    "Step 3: The area is length × width = 12 × 6 = 72 square centimeters.\n"
    "Answer: 72"
)
_EXAMPLE_1_VERIFICATION = (
    "## Step 1: Express the perimeter in terms of the width\n"
    "Calling the width w makes the length 2w, as the problem states. The perimeter of a rectangle is twice "
    "the sum of its length and width: 2(w + 2w) = 6w. Setting 6w = 36 gives w = 6, and the division is "
    "right.\n"
    f"{STEP_CORRECT_MARKER}\n"
    "\n"
    "## Step 2: Find the length\n"
    "With w = 6 the length is 2 × 6 = 12 cm. As a check, 2(12 + 6) = 36 reproduces the given perimeter.\n"
    f"{STEP_CORRECT_MARKER}\n"
    "\n"
    "## Step 3: Compute the area\n"
    "The area is 12 × 6 = 72. The product is right and the unit (square centimeters) is the one asked for.\n"
    f"{STEP_CORRECT_MARKER}\n"
    "\n"
    f"{final_verdict_line(True)}"
)

# Worked example 2: the first error is in step 3; steps 4 and 5 reuse the wrong value, so they are marked
# incorrect too (error propagation), even though their own arithmetic is right.
_EXAMPLE_2_QUESTION = (
    "A jacket costs $80. The store first raises its price by 25%, then takes 20% off the raised price, and "
    "finally adds a 5% sales tax to the discounted price. How much does a customer pay for the jacket?"
)
_EXAMPLE_2_ANSWER = "$84"
_EXAMPLE_2_SOLUTION = (
    "Step 1: The raised price is 80 × 1.25 = $100.\n"
    "Step 2: The discount is 20% of $100, which is $20.\n"
    "Step 3: The discounted price is $100 − $20 = $70.\n"
    "Step 4: The sales tax is 5% of $70, which is $3.50.\n"
    "Step 5: The customer pays $70 + $3.50 = $73.50.\n"
    "Answer: $73.50"
)
_EXAMPLE_2_VERIFICATION = (
    "## Step 1: Apply the 25% increase\n"
    "A 25% increase multiplies the price by 1.25, and 80 × 1.25 = 100, so the raised price is $100.\n"
    f"{STEP_CORRECT_MARKER}\n"
    "\n"
    "## Step 2: Compute the discount\n"
    "The discount applies to the raised price: 0.20 × 100 = 20, so the discount is $20.\n"
    f"{STEP_CORRECT_MARKER}\n"
    "\n"
    "## Step 3: Subtract the discount\n"
    "100 − 20 = 80, not 70. This is a subtraction error: the discounted price should be $80.\n"
    f"{STEP_INCORRECT_MARKER}\n"
    "\n"
    "## Step 4: Compute the sales tax\n"
    "Taking 5% of the discounted price is the right method, and 5% of 70 is 3.50, but the step starts from "
    "the wrong price of Step 3. With the right price the tax is 0.05 × 80 = $4.\n"
    f"{STEP_INCORRECT_MARKER}\n"
    "\n"
    "## Step 5: Add the tax\n"
    "The sum 70 + 3.50 = 73.50 carries the earlier error into the answer. The customer should pay "
    "80 + 4 = $84.\n"
    f"{STEP_INCORRECT_MARKER}\n"
    "\n"
    f"{final_verdict_line(False)}"
)


def _verifier_example(number: int, question: str, solution: str, verification: str,
                      expected_answer: str | None) -> str:
  expected = f"Expected Answer: {expected_answer}\n\n" if expected_answer is not None else ""
  return (
      f"Example {number}\n"
      "\n"
      f"Question: {question}\n"
      "\n"
      f"{expected}"
      "Student Solution:\n"
      f"{solution}\n"
      "\n"
      "Teacher Verification:\n"
      f"{verification}\n"
  )


def verifier_prompt(problem: str, solution: str, expected_answer: str | None = None) -> str:
  """The two-shot teacher-grading prompt; with `expected_answer` it becomes the reference-guided variant.

  Without a reference this is SPARK's reference-free verifier: the teacher must re-derive everything. With
  a reference (D7 "ceiling" baseline) the only differences are one instruction sentence and the
  `Expected Answer:` lines, so that comparing the two isolates the effect of the reference.

  Args:
    problem: the math problem text.
    solution: the generator's step-numbered solution (thinking already removed by the caller).
    expected_answer: the ground-truth answer as a plain string, or None for the reference-free prompt.
  """
  with_reference = expected_answer is not None
  reference_sentence = (
      "You are also given the expected final answer: besides checking each step on its own merits, check "
      "whether the work leads to the expected answer, and use the Expected Answer as a guide when you decide "
      "whether the student's work is correct.\n\n"
      if with_reference else ""
  )
  expected_line = f"Expected Answer: {expected_answer}\n\n" if with_reference else ""
  example_1 = _verifier_example(1, _EXAMPLE_1_QUESTION, _EXAMPLE_1_SOLUTION, _EXAMPLE_1_VERIFICATION,
                                _EXAMPLE_1_ANSWER if with_reference else None)
  example_2 = _verifier_example(2, _EXAMPLE_2_QUESTION, _EXAMPLE_2_SOLUTION, _EXAMPLE_2_VERIFICATION,
                                _EXAMPLE_2_ANSWER if with_reference else None)
  return (
      "You are a mathematics teacher checking a student's written solution. Go through the solution step "
      "by step and find any mistakes. For every step, first write your analysis and then give a verdict. "
      "Check the reasoning, the calculations and the logic of each step yourself instead of trusting the "
      "student.\n"
      "\n"
      f"{reference_sentence}"
      "Important: every step is judged either correct or incorrect; there is no partial credit. A step "
      "that contains any error or leaves out something it needs is incorrect. A step that builds on an "
      "earlier mistake is incorrect as well, even when its own arithmetic is right.\n"
      "\n"
      "Start the analysis of each step with a heading of the form `## Step k: <short title>` and end it "
      f"with exactly one of the two lines {STEP_CORRECT_MARKER} or {STEP_INCORRECT_MARKER} After the last "
      f"step, give your final verdict on its own line in the form **{FINAL_VERDICT_QUESTION} X**, where X "
      "is either Yes or No.\n"
      "\n"
      "Here are two graded examples.\n"
      "\n"
      f"{example_1}"
      "\n"
      f"{example_2}"
      "\n"
      "Now grade the following student solution step by step in the same way.\n"
      "\n"
      f"Question: {problem}\n"
      "\n"
      f"{expected_line}"
      "Student Solution:\n"
      f"{solution}\n"
      "\n"
      "Teacher Verification:"
  )


# --------------------------------------------------------------------------------------------------------
# Meta-critique: critic, then merger (docs/method.md §2.6, D6)
# --------------------------------------------------------------------------------------------------------


def _review_inputs(problem: str, solution: str, verification: str) -> str:
  """The tagged problem / solution / verification block the critic and the merger both read."""
  return (f"<Problem>\n{problem}\n</Problem>\n\n<Solution Path>\n{solution}\n</Solution Path>\n\n"
          f"<Original Verification>\n{strip_thinking(verification)}\n</Original Verification>\n")


def critic_prompt(problem: str, solution: str, verification: str) -> str:
  """Asks a model to audit one verification; the output is a free-form critique (no fixed labels).

  The verification's `<think>` trace is removed here, not by the caller, because the critic must judge
  only the verdict text that would become a training target.
  """
  return (
      "You are reviewing the work of a math verifier. The verifier was given a problem and a student's "
      "step-by-step solution, judged every step as correct or incorrect, and then gave a final verdict. "
      "Your job is to decide whether that step-by-step verification is itself right.\n"
      "\n"
      + _review_inputs(problem, solution, verification) +
      "\n"
      "A verification can go wrong in four ways:\n"
      "1. Missing errors: a step that contains a mistake is marked correct.\n"
      "2. False positives: a step without any mistake is marked incorrect.\n"
      "3. Wrong reasoning: the verdict of a step is right, but its explanation is wrong or incomplete.\n"
      "4. Inconsistent final verdict: the final Yes/No does not follow from the step verdicts and the "
      "student's final answer.\n"
      "\n"
      "How to review:\n"
      "- Re-check every step of the student's solution yourself, independently of the verifier, or with a "
      "different method (substituting back, estimating, or solving another way).\n"
      "- For each step, ask: is the student's step actually right? Does the verifier's verdict agree with "
      "that? Is the verifier's explanation sound?\n"
      "- Finally, ask whether the final verdict is consistent with the step verdicts.\n"
      "\n"
      "Write your answer in this form:\n"
      "**Critique of the original verification**: <for each step, whether the verifier's verdict and "
      "reasoning hold up and why; then whether the final verdict holds up>\n"
      "\n"
      "Now critique the original verification and state clearly, for each step, whether the verifier "
      "analyzed it correctly."
  )


def merger_prompt(problem: str, solution: str, verification: str, critique: str) -> str:
  """Asks a model to fold a critique into the verification, producing one verification in the teacher format.

  The merged text is parsed with the same verification parser as raw verifications, so the prompt insists
  on the exact markers and forbids any mention of the critique (a trained PRM never sees one).
  """
  return (
      "You will be given a math problem, a student's solution, a step-by-step verification of that "
      "solution, and a critique of the verification. Combine the verification and the critique into a "
      "single, improved verification.\n"
      "\n"
      + _review_inputs(problem, solution, verification) +
      "\n"
      "<Critique of the Verification>\n"
      f"{strip_thinking(critique)}\n"
      "</Critique of the Verification>\n"
      "\n"
      "Rules:\n"
      "- Write the result as one self-contained verification, as though it had been written in a single "
      'pass. Where a judgement is revised or confirmed, use reflective, transitional wording ("Checking '
      'this again, ...", "On closer inspection, ...").\n'
      '- Never mention an "original verification", a "critique", or any other source.\n'
      "- If the critique found real errors in the verification, fix the analysis, change the affected step "
      "verdicts, and make the final verdict agree with the corrected steps.\n"
      "- If the critique confirmed the verification, keep every step verdict and the final verdict, and "
      "enrich the explanations.\n"
      "- Use exactly the format below and nothing else: one block per step of the student's solution, "
      "then the final verdict line, where X is Yes or No.\n"
      "\n"
      "## Step 1: <short title>\n"
      "<analysis>\n"
      f"{STEP_CORRECT_MARKER} or {STEP_INCORRECT_MARKER}\n"
      "\n"
      "## Step 2: <short title>\n"
      "...\n"
      "\n"
      f"**{FINAL_VERDICT_QUESTION} X**"
  )
