"""megatron-core backend: model provider, HF <-> Megatron weights, attention, loss, actor.

Nothing here imports Ray; `actor.MegatronActor` runs in one process per rank (torchrun-style
or inside a Ray actor).
"""
