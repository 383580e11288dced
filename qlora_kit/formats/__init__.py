"""One class per weight format (NF4, FP4, int8, int4, fp8)."""
