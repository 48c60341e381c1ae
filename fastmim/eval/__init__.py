"""Evaluation and export: fine-tuning (method 6), linear probing, timm export and reconstruction pictures.

Modules import timm / safetensors / scikit-learn lazily (the ``eval`` extra), so ``import fastmim`` needs none of
them. Entry points: :func:`fastmim.eval.finetune.finetune`, :func:`fastmim.eval.linprobe.linprobe`,
:func:`fastmim.eval.export.export_timm`, :func:`fastmim.eval.visualize.visualize`.
"""
