"""The web portal (Hyper-V Manager and the self-service portal in a browser), served by
``waymark serve`` at ``/`` (:mod:`waymark.web.pages`)."""
