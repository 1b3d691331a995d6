"""Training: recipes (TOML, :mod:`.config`), the training-run layer shared with alignment (:mod:`.run`), optimizer
and schedule (:mod:`.optim`), checkpoints (:mod:`.checkpoint`), the pre-training loop (:mod:`.pretrain`), expert
parallelism (:mod:`.expert_parallel`) and HF export (:mod:`.export`). Alignment is :mod:`dscoder.align`."""
