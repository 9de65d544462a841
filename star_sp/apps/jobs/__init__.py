"""The training jobs behind ``launch/finetune.py`` (``finetune.py``) and ``launch/megatron_gpt.py``
(``megatron_gpt.py``): their settings, data, the shared step loop, optimizer steppers, checkpoints and
tracking."""
