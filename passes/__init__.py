"""sparsec.passes"""
