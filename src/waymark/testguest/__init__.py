"""The test guest builder (tests and `waymark guest` only; never imported by product code)."""
