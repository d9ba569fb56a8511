pub mod clienthello;
