"""Several postoffice nodes on one PostgreSQL ([cluster] database; docs/cluster.md)."""
