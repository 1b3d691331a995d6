"""Alignment: supervised fine-tuning (:mod:`.sft`), a reward model (:mod:`.reward`) and GRPO (:mod:`.grpo`), with
their recipes (:mod:`.recipe`) and ``dscoder train sft | reward | grpo`` (:mod:`.cli`).

Built on the training-run layer :mod:`dscoder.train.run` (recipe → model, resume, metrics, checkpoints, the
optimizer step), which pre-training uses as well.
"""
