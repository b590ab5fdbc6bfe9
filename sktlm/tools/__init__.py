"""Tools on finished runs: opening a run (`runs`), sampling (`decode`), evaluation, muP coordinate checks.
"""
