pub mod codec; pub mod dirty; pub mod memory;
