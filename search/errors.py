"""The search's user-facing error."""

from autodiffusion_rt.errors import Error


class SearchError(Error):
    """Bad search settings, an infeasible budget, or a checkpoint that does not fit this search."""
