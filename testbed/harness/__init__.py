"""The experiment harness: topologies (local, network namespaces, cluster), worker processes and agents,
the coordinator, the Ceph RGW launcher.  ``python -m testbed`` runs it."""
