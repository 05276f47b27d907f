"""The guest side: the test guest builder and (later) the guest agent client."""
