"""sglang-shplb: S-HPLB (head-adaptive sparse attention + balanced head placement) for stock SGLang.

Pipeline: profile -> budget -> plan (place) -> serve. The core modules never import SGLang;
`sglang_shplb.sglang_adapter` is the only package that does.
"""
__version__ = "0.1.0"
