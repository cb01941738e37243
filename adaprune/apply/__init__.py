"""Acting on a Plan: `mask` (reversible zeros) and `slice` (smaller tensors), both checked before any change."""
