"""The embedded essay world: a fact base, prompts, a simulated human corpus and an exact gold grader.

Modules: `grammar` (kinds, schemas, sentence templates), `world` (`World`, prompts, human writers),
`grader` (`GoldScores`, the weighted gold score), `labeller` (the budgeted `Labeller`), `commands` (the CLI).
"""

from selfplay.world.grader import BEST, GOLD_FIELDS, GoldScores, mean_scores
from selfplay.world.grammar import A_KIND, ATTRIBUTES, KINDS, SCHEMA, TEMPLATES
from selfplay.world.labeller import BudgetExhausted, Labeller
from selfplay.world.world import NotAWorldPrompt, Prompt, World

__all__ = [
    "ATTRIBUTES",
    "A_KIND",
    "BEST",
    "GOLD_FIELDS",
    "KINDS",
    "SCHEMA",
    "TEMPLATES",
    "BudgetExhausted",
    "GoldScores",
    "Labeller",
    "NotAWorldPrompt",
    "Prompt",
    "World",
    "mean_scores",
]
