"""Folders Waymark owns on shared or external storage (untrusted, may outlive the host): backup
repositories, library shares, and the marker file and confined opening they share."""
