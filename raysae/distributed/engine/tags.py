"""The MLflow tag names the engine writes on a member's run. A re-submitted sweep reads them
back (which rule stopped a run, why, at how many tokens), so they are part of resumption."""

GROUP_TAG = "raysae.group"
"""The key of the group (Ray Train run) a member trained in."""
NODES_TAG = "raysae.nodes"
"""The Ray node ids a member trained on, in order."""
TOKENS_TAG = "raysae.tokens_seen"
"""On a finished member's run: the tokens it trained."""
ERROR_TAG = "raysae.error"
"""On a member's run that failed while its group went on: why."""
STOP_TAG = "raysae.stop"
"""On the run of a member with a stop rule: why it stopped (`target: ...`, `plateau: ...`), or
that it ran its budget without (`budget: ...`)."""
STOP_RULE_TAG = "raysae.stop_rule"
"""On the run of a member with a stop rule (or one that went on after a stop): the rule it was
decided by (`stopping.signature`): a sweep re-submitted with another rule re-decides it."""
