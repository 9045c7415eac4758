//! tokenfab core
