"""Feature-quality evaluations shared by both studies: contrastive tasks, direct logit
attribution, task circuits by attribution patching, and static feature dashboards."""
