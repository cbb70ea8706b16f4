"""Training recipe of the discrete image autoencoder (section 4.1, Appendix B.1)."""
