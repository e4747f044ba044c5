"""Tests of the benchmark scripts (``conftest.py`` puts ``bench/`` on the import path)."""

from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"

# A stand-in liger_kernel whose patch functions (Llama's, Gemma 3's) kill their process: the
# orchestrators must record that case's failure and still run the others.
FAKE_LIGER = """import os


def apply_liger_kernel_to_llama():
    print("fake liger crash", flush=True)
    os._exit(3)


apply_liger_kernel_to_gemma3_text = apply_liger_kernel_to_llama
"""
