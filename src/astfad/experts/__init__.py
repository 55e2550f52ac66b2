"""Anomaly experts: each turns backbone features into a patch distance map."""
