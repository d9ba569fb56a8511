pub mod clienthello;
pub mod balancer;
