pub mod clienthello;
pub mod balancer;
pub mod metrics;
pub mod forward;
pub mod health;
pub mod listener;
pub mod session;
