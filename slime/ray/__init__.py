"""Ray orchestration: placement groups, the train actor group and the rollout manager.

No tensor math here: data moves between actors as Ray object refs.
"""
