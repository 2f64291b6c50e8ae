"""Pipelines that combine the layers below (label, train, arith, cluster, eval)."""
