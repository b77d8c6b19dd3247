"""OAuth2 and SMART plumbing on Authlib, shared by the vendor API and the SMART app; imports neither."""
