"""The embedded essay world: a fact base, prompts, a simulated human corpus and an exact gold grader."""
